"""Constrained decoding on a tiny random-weight model with the real Qwen2 tokenizer: left alone it writes
garbage, so every output that parses and validates (with `jsonschema`, `re.fullmatch` and Python's own parser
for the arithmetic grammar) shows the mask doing the work, in greedy, sampling, batched and beam decoding."""

from __future__ import annotations

import ast
import json
import re

import jsonschema
import pytest
import torch

import qwen2
from qwen2.constrained import ConstrainedLogitsProcessor

from schemas import SCHEMAS

VOCAB = 151936


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return qwen2.AutoTokenizer.from_pretrained(str(default_gguf))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = qwen2.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
                               pad_token_id=tokenizer.pad_token_id)
    model = qwen2.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the default init: the random model has strong, wrong opinions
        model.lm_head.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two prompts of different lengths, left-padded."""
    tokenizer.padding_side = "left"
    return tokenizer(["Give me JSON:", "Here is a much longer prompt, answer in JSON please:"], return_tensors="pt",
                     padding=True)


def _answers(tokenizer, sequences, prompt_length):
    return [tokenizer.decode(row[prompt_length:], skip_special_tokens=True) for row in sequences]


def _ended(tokenizer, sequences, prompt_length):
    """Every row stopped on an end token (not cut by max_new_tokens)."""
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return all(any(int(t) in ends for t in row[prompt_length:]) for row in sequences)


def test_unconstrained_output_is_not_json(model, tokenizer, batch):
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    for answer in _answers(tokenizer, out, batch["input_ids"].shape[1]):
        with pytest.raises(ValueError):
            json.loads(answer)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_greedy_and_sampled_outputs_validate(model, tokenizer, batch, name):
    schema = SCHEMAS[name]
    length = batch["input_ids"].shape[1]
    for options in (dict(do_sample=False), dict(do_sample=True, seed=4, temperature=1.5, num_return_sequences=2)):
        out = model.generate(**batch, json_schema=schema, tokenizer=tokenizer, max_new_tokens=80, **options)
        assert _ended(tokenizer, out, length), options
        for answer in _answers(tokenizer, out, length):
            jsonschema.validate(json.loads(answer), schema)


@pytest.mark.parametrize("name", ["flat_object", "ref_defs", "array_bounds"])
def test_beam_search_follows_the_beams(model, tokenizer, batch, name):
    schema = SCHEMAS[name]
    length = batch["input_ids"].shape[1]
    for options in (dict(), dict(do_sample=True, seed=5)):
        out = model.generate(**batch, json_schema=schema, tokenizer=tokenizer, max_new_tokens=60, num_beams=3,
                             num_return_sequences=3, **options)
        assert out.shape[0] == 6
        for answer in _answers(tokenizer, out, length):
            jsonschema.validate(json.loads(answer), schema)


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[a-z]{1,8}@[a-z]{2,5}\.(com|org)",
                                     r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"])
def test_regex_outputs_match(model, tokenizer, batch, pattern):
    length = batch["input_ids"].shape[1]
    for options in (dict(do_sample=False), dict(do_sample=True, seed=11, num_return_sequences=2)):
        out = model.generate(**batch, regex=pattern, tokenizer=tokenizer, max_new_tokens=40, **options)
        for answer in _answers(tokenizer, out, length):
            assert re.fullmatch(pattern, answer), (options, answer)


# Arithmetic with bounded repetition (llguidance's `~n..m`), so a random model cannot run on forever.
ARITHMETIC = r"""
start: sum
sum: prod (("+" | "-") prod)~0..1
prod: atom (("*" | "/") atom)~0..1
atom: NUMBER | "(" NUMBER (("+" | "-" | "*") NUMBER)~1..2 ")"
NUMBER: /[1-9][0-9]{0,2}/
"""


def test_lark_grammar_outputs_parse(model, tokenizer, batch):
    length = batch["input_ids"].shape[1]
    for options in (dict(do_sample=False), dict(do_sample=True, seed=2), dict(do_sample=True, seed=9)):
        out = model.generate(**batch, grammar=ARITHMETIC, tokenizer=tokenizer, max_new_tokens=48, **options)
        assert _ended(tokenizer, out, length)
        for answer in _answers(tokenizer, out, length):
            assert re.fullmatch(r"[0-9+\-*/()]+", answer), answer
            tree = ast.parse(answer, mode="eval")  # Python's own parser: a well-formed arithmetic expression
            assert all(isinstance(node, (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
                                         ast.Div)) for node in ast.walk(tree)), answer


def test_processor_object_and_choices(model, tokenizer, batch):
    length = batch["input_ids"].shape[1]
    processor = ConstrainedLogitsProcessor(tokenizer, choice=["alpha", "beta gamma", "δέλτα"],
                                           eos_token_id=model.config.eos_token_id)
    for seed in (0, 1, 2):  # one processor, reused across generate() calls
        out = model.generate(**batch, logits_processor=[processor], do_sample=True, seed=seed, max_new_tokens=10)
        assert set(_answers(tokenizer, out, length)) <= {"alpha", "beta gamma", "δέλτα"}


def test_min_new_tokens_lets_a_complete_grammar_end(model, tokenizer, batch):
    """min_new_tokens bans the end tokens, which are all a finished grammar allows: the answer still ends there,
    instead of the decode loop picking a token outside the grammar from a row of -inf."""
    length = batch["input_ids"].shape[1]
    for options in (dict(do_sample=False), dict(do_sample=True, seed=3)):
        out = model.generate(**batch, regex=r"(yes|no)", tokenizer=tokenizer, min_new_tokens=6, max_new_tokens=10,
                             **options)
        assert _ended(tokenizer, out, length)
        assert set(_answers(tokenizer, out, length)) <= {"yes", "no"}, options


def test_streamed_tokens_equal_generate(model, tokenizer, batch):
    schema = SCHEMAS["nested_object"]
    whole = model.generate(**batch, json_schema=schema, tokenizer=tokenizer, max_new_tokens=60, do_sample=False)
    streamed = torch.stack(list(model.generate_stream(**batch, json_schema=schema, tokenizer=tokenizer,
                                                      max_new_tokens=60, do_sample=False)), dim=1)
    assert torch.equal(whole[:, batch["input_ids"].shape[1]:], streamed)


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"type": "nonsense"}), "Invalid json_schema: Invalid type"),
    (dict(json_schema={"$ref": "#/$defs/missing"}), "does not exist"),
    (dict(json_schema={"type": "string", "pattern": "(("}), "unclosed group"),
    (dict(regex="[a-"), "Invalid regex"),
    (dict(grammar="start: undefined_rule"), "unknown name"),
])
def test_invalid_constraints_are_refused_before_generating(model, tokenizer, batch, kwargs, message):
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            model.generate(**batch, tokenizer=tokenizer, max_new_tokens=5, **kwargs)
    finally:
        model._forward_pre_hooks.clear()
    assert calls == []


def test_constraint_without_a_tokenizer_is_a_clear_error(model, batch):
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        model.generate(**batch, json_schema={"type": "object"}, max_new_tokens=5)


def test_constraint_runs_in_transformers_generate_too(model, tokenizer, batch):
    """The processor is a plain (input_ids, scores) callable: transformers' beam search, which reorders its rows
    its own way, produces valid output with it, and the same sequences as our beam search."""
    import transformers

    theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**model.config.to_dict())).eval()
    theirs.load_state_dict(model.state_dict(), strict=True)
    schema = SCHEMAS["ref_defs"]
    processor = ConstrainedLogitsProcessor(tokenizer, json_schema=schema, eos_token_id=model.config.eos_token_id)
    out = theirs.generate(**batch, logits_processor=transformers.LogitsProcessorList([processor]), num_beams=3,
                          num_return_sequences=2, max_new_tokens=60, pad_token_id=tokenizer.pad_token_id)
    for answer in _answers(tokenizer, out, batch["input_ids"].shape[1]):
        jsonschema.validate(json.loads(answer), schema)
    ours = model.generate(**batch, logits_processor=[processor], num_beams=3, num_return_sequences=2,
                          max_new_tokens=60)
    assert torch.equal(ours, out)


@pytest.mark.parametrize("use_fast", [False, True], ids=["python", "fast"])
def test_both_tokenizers_spell_multibyte_text_for_the_grammar(default_gguf, use_fast):
    """The token table built from the vocabulary gives llguidance each token's bytes: a valid answer's own tokens
    (accents, CJK, an emoji split over byte-level tokens) are accepted to the end, an invalid one is refused."""
    from qwen2.constrained import compile_constraint

    tok = qwen2.AutoTokenizer.from_pretrained(str(default_gguf), use_fast=use_fast)
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    valid = compile_constraint(tok, json_schema=schema)
    assert all(valid.advance(t) for t in tok.encode('{"s": "héllo 世界 🙂"}', add_special_tokens=False))
    assert valid.finished and valid.advance(tok.eos_token_id)
    invalid = compile_constraint(tok, json_schema=schema)
    assert not all(invalid.advance(t) for t in tok.encode('{"t": 1}', add_special_tokens=False))
    assert invalid.failed


@pytest.mark.parametrize("vocab", [70, 96, 150], ids=["narrower", "exact", "padded"])
def test_masking_equals_llguidance_own_kernel(vocab):
    """Our byte-table masking sets the same logits to -inf as llguidance's reference numpy kernel, for scores
    narrower than the bitmask's 96 tokens, as wide, and wider (a model's padded vocabulary rows)."""
    from llguidance.numpy import apply_token_bitmask_inplace

    from qwen2.constrained import apply_bitmask, apply_bitmask_

    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 3), dtype=torch.int32, generator=generator)
    bitmask[0], bitmask[1], bitmask[2, 1] = 0, -1, -2**31  # nothing, everything, only the last bit
    scores = torch.randn(5, vocab, generator=generator)
    expected = scores.numpy().copy()
    apply_token_bitmask_inplace(expected, bitmask.numpy())
    assert torch.equal(apply_bitmask(scores, bitmask), torch.from_numpy(expected))
    in_place = scores.clone()
    apply_bitmask_(in_place, bitmask)
    assert torch.equal(in_place, torch.from_numpy(expected))
