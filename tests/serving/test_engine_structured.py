"""Structured output in the serving engine, on a tiny random model with the real Qwen2 tokenizer (left alone it
writes garbage, so valid output shows the mask at work): greedy constrained answers equal generate()'s with the
same constraint (the oracle: qwen2.constrained's processor in the plain decode loop), sampled ones parse and
validate with `jsonschema`, choices and regexes hold, unconstrained neighbours in the batch are untouched, and
bad constraints are refused before any token."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

import qwen2
from engine_harness import make_engine, run_to_end
from qwen2.serving import SamplingParams, StructuredOutputsParams

VOCAB = 151936
PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 1, "maxItems": 3},
    "ref": {"$ref": "#/$defs/point"}, "note": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
    "required": ["tags", "ref", "note"], "additionalProperties": False,
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
                        "required": ["x"], "additionalProperties": False}}}
PROMPTS = ["Give me JSON:", "Here is a much longer prompt, answer in JSON please:", "Hi"]


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return qwen2.AutoTokenizer.from_pretrained(str(default_gguf))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = qwen2.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               eos_token_id=tokenizer.eos_token_id)
    model = qwen2.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharp logits: the random model has strong, wrong opinions
        model.lm_head.weight.normal_(0, 1.0)
    return model


def _run(engine, requests: list[tuple[list[int], SamplingParams]]) -> list:
    for i, (ids, params) in enumerate(requests):
        engine.add_request(str(i), ids, params)
    done = run_to_end(engine)
    return [done[str(i)] for i in range(len(requests))]


def _json(**kwargs) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("schema, texts", [(PERSON, PROMPTS[:2]), (NESTED, PROMPTS[1:])], ids=["person", "nested"])
def test_greedy_constrained_equals_generate_with_the_same_schema(model, tokenizer, schema, texts):
    prompts = [tokenizer.encode(p) for p in texts]
    engine = make_engine(model, tokenizer, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=48, structured_outputs=_json(json=schema))
    outputs = _run(engine, [(ids, params) for ids in prompts])
    for ids, output in zip(prompts, outputs):
        expected = model.generate(torch.tensor([ids]), json_schema=schema, tokenizer=tokenizer, max_new_tokens=48,
                                  do_sample=False, disable_compile=True)[0, len(ids):].tolist()
        assert output.outputs[0].token_ids == expected
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), schema)


def test_sampled_n_samples_validate_and_the_free_neighbour_is_untouched(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    free = SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True)
    alone = _run(make_engine(model, tokenizer), [(prompts[2], free)])[0].outputs[0]
    constrained = SamplingParams(temperature=1.5, seed=7, n=2, max_tokens=48,
                                 structured_outputs=_json(json=NESTED))
    engine = make_engine(model, tokenizer, max_num_seqs=8)
    outputs = _run(engine, [(prompts[0], constrained), (prompts[2], free), (prompts[1], constrained)])
    texts = [sample.text for i in (0, 2) for sample in outputs[i].outputs]
    for text in texts:
        jsonschema.validate(json.loads(text), NESTED)
    assert len(set(texts)) > 1  # the samples were drawn, each from its own copy of the grammar
    assert outputs[1].outputs[0].token_ids == alone.token_ids
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("kind, value, check", [
    ("choice", ["alpha", "beta gamma", "δέλτα"], lambda text: text in {"alpha", "beta gamma", "δέλτα"}),
    ("regex", r"[a-z]{1,8}@[a-z]{2,5}\.(com|org)", lambda text: re.fullmatch(r"[a-z]{1,8}@[a-z]{2,5}\.(com|org)",
                                                                            text)),
    ("grammar", 'start: "(" NUM ("+" NUM)~0..2 ")"\nNUM: /[1-9][0-9]?/',
     lambda text: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?){0,2}\)", text)),
])
def test_choice_regex_and_grammar(model, tokenizer, kind, value, check):
    ids = tokenizer.encode(PROMPTS[0])
    requests = [(ids, SamplingParams(temperature=t, seed=s, max_tokens=60, structured_outputs=_json(**{kind: value})))
                for t, s in ((0, None), (1.0, 1), (1.0, 2))]
    for output in _run(make_engine(model, tokenizer), requests):
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        assert check(output.outputs[0].text), output.outputs[0].text


def test_json_object_is_generate_with_an_object_schema(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[1])
    params = SamplingParams(temperature=0, max_tokens=16, structured_outputs=_json(json_object=True))
    output = _run(make_engine(model, tokenizer), [(ids, params)])[0].outputs[0]
    expected = model.generate(torch.tensor([ids]), json_schema={"type": "object"}, tokenizer=tokenizer,
                              max_new_tokens=16, do_sample=False, disable_compile=True)[0, len(ids):].tolist()
    assert output.token_ids == expected and output.text.startswith("{")


def test_preempted_constrained_sequence_recomputes_the_same_answer(model, tokenizer):
    """Three constrained requests in a pool too small for all of them: some are preempted and recomputed, and
    every answer equals the one it gets in a pool with room for all."""
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=_json(json=NESTED))
    requests = [(tokenizer.encode(p), params) for p in PROMPTS]
    roomy = _run(make_engine(model, tokenizer, max_num_seqs=4), requests)
    engine = make_engine(model, tokenizer, blocks=6, block_size=8, max_num_seqs=4)
    outputs = _run(engine, requests)
    assert engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in roomy]


def test_min_tokens_lets_a_finished_grammar_end(model, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=30, min_tokens=20,
                            structured_outputs=_json(choice=["yes", "no"]))
    output = _run(make_engine(model, tokenizer), [(tokenizer.encode(PROMPTS[0]), params)])[0].outputs[0]
    assert output.text in {"yes", "no"} and output.finish_reason == "stop"


@pytest.mark.parametrize("constraint, message", [
    (dict(json={"type": "nonsense"}), "structured_outputs: Invalid json_schema"),
    (dict(regex="[a-"), "structured_outputs: Invalid regex"),
    (dict(grammar="start: undefined_rule"), "unknown name"),
    (dict(choice=[]), "choice must be a non-empty list"),
])
def test_bad_constraints_are_refused_before_any_token(model, tokenizer, constraint, message):
    engine = make_engine(model, tokenizer)
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("x", tokenizer.encode("Hi"), SamplingParams(structured_outputs=_json(**constraint)))
    assert not engine.has_unfinished_requests()


def test_structured_outputs_takes_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar or json_object"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})


def test_a_schema_too_slow_to_compile_is_refused_within_the_timeout(model, tokenizer):
    """500 patterned properties take llguidance a good fraction of a second; the engine's bound of 10 ms
    refuses the schema instead of waiting for it."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1}}}x$"}
                                               for i in range(500)}}
    engine = make_engine(model, tokenizer, structured_outputs_timeout=0.01)
    with pytest.raises(ValueError, match="took longer than 0.01 s to compile"):
        engine.add_request("x", tokenizer.encode("Hi"), SamplingParams(structured_outputs=_json(json=schema)))
