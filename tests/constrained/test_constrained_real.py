"""Constrained decoding on the real default model (slow): answers to ten JSON schemas, greedy and with seeded
sampling (two, two answers each), all parse and validate with `jsonschema`; a regex and a choice list hold too."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import qwen2
from qwen2.constrained import ConstrainedLogitsProcessor

from schemas import SCHEMAS

REAL = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3},
    **{name: SCHEMAS[name] for name in ("nested_object", "enum", "bounded_number", "string_pattern", "any_of",
                                        "ref_defs", "optional_fields", "array_of_objects")},
}


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return qwen2.AutoTokenizer.from_pretrained(str(default_gguf))


def _prompt(tokenizer, schema):
    messages = [{"role": "user", "content": f"Answer with one JSON value matching this schema: {json.dumps(schema)}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def _answer(tokenizer, inputs, out):
    return [tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_real_model_json_answers_validate(our_gguf_model, tokenizer, sampling):
    names = sorted(REAL) if not sampling else ["person", "ref_defs"]
    for name in names:
        inputs = _prompt(tokenizer, REAL[name])
        options = dict(do_sample=True, seed=1, temperature=1.0, num_return_sequences=2) if sampling else {}
        out = our_gguf_model.generate(**inputs, json_schema=REAL[name], tokenizer=tokenizer, max_new_tokens=48,
                                      disable_compile=True, **options)
        for answer in _answer(tokenizer, inputs, out):
            jsonschema.validate(json.loads(answer), REAL[name])


@pytest.mark.slow
def test_real_model_regex_and_choice(our_gguf_model, tokenizer):
    messages = [{"role": "user", "content": "What is today's date? Reply with a date."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    pattern = r"\d{4}-\d{2}-\d{2}"
    out = our_gguf_model.generate(**inputs, regex=pattern, tokenizer=tokenizer, max_new_tokens=12,
                                  disable_compile=True)
    assert re.fullmatch(pattern, _answer(tokenizer, inputs, out)[0])
    processor = ConstrainedLogitsProcessor(tokenizer, choice=["positive", "negative"])
    messages = [{"role": "user", "content": "Sentiment of 'I love this!'?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = our_gguf_model.generate(**inputs, logits_processor=[processor], max_new_tokens=6, disable_compile=True)
    assert _answer(tokenizer, inputs, out) == ["positive"]
