"""generate()'s refusals (issue 20): what transformers' `GenerationConfig.validate` refuses is refused here too
(the oracle), and so are the values it lets through that can only crash or make garbage; prompts with ids
outside the vocabulary or rows masked out entirely are refused before any model call."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import qwen2
from qwen2.generation import GenerationConfig

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)
PROMPT = torch.tensor([[1, 2, 3]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**TINY)).eval()


# What transformers' GenerationConfig refuses on its own (construction or validate()).
REFUSED_BY_THE_REFERENCE = [
    dict(early_stopping="maybe"), dict(max_new_tokens=0), dict(max_new_tokens=-5),
    dict(num_return_sequences=2), dict(num_beams=2, num_return_sequences=3),
    dict(suppress_tokens=[5, 6], forced_bos_token_id=5), dict(suppress_tokens=[7], forced_eos_token_id=[7]),
    dict(assistant_ensemble_weight=1.5), dict(logits_processor=[]),
]


def _reference_refuses(kwargs: dict) -> bool:
    try:
        transformers.GenerationConfig(**kwargs).validate()
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("kwargs", REFUSED_BY_THE_REFERENCE, ids=str)
def test_refused_as_generation_config_validate_refuses(model, kwargs):
    assert _reference_refuses(kwargs)
    with pytest.raises(ValueError):
        GenerationConfig(**kwargs)
    if "logits_processor" not in kwargs:  # a generate() argument of its own, wrong only inside a config
        with pytest.raises(ValueError):
            model.generate(PROMPT, **{"max_new_tokens": 3, **kwargs})


# Accepted by the reference's validate(); each can only crash generate() or produce garbage.
GARBAGE = [
    (dict(num_beams=0), "num_beams"), (dict(num_beams=-1), "num_beams"), (dict(num_beams=1.5), "num_beams"),
    (dict(num_return_sequences=0), "num_return_sequences"), (dict(num_return_sequences=-1), "num_return_sequences"),
    (dict(do_sample=True, temperature=math.inf), "temperature"),
    (dict(do_sample=True, temperature=math.nan), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"), (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(no_repeat_ngram_size=2.5), "no_repeat_ngram_size"),
    (dict(min_new_tokens=10, max_new_tokens=5), "min_new_tokens"), (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(max_new_tokens=1.5), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_length=-3), "max_length"), (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(num_beams=2, length_penalty=math.nan), "length_penalty"),
    (dict(do_sample=True, top_p=1.5), "top_p"), (dict(do_sample=True, top_k=-5), "top_k"),
    (dict(do_sample=True, epsilon_cutoff=1.5), "epsilon_cutoff"), (dict(do_sample=True, eta_cutoff=-1.0), "eta_cutoff"),
    (dict(do_sample=True, typical_p=0.0), "typical_p"), (dict(do_sample=True, min_p=2.0), "min_p"),
    (dict(max_time=-1.0), "max_time"),
]


@pytest.mark.parametrize("kwargs,field", GARBAGE, ids=lambda v: str(v)[:50])
def test_garbage_producing_values_are_refused(model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        model.generate(PROMPT, **{"max_new_tokens": 3, **kwargs})


def test_values_set_on_a_config_object_are_checked_too(model):
    config = GenerationConfig(max_new_tokens=3)
    config.num_beams = 0  # bypasses the constructor's check
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(PROMPT, generation_config=config)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(do_sample=True, top_k=0), dict(top_p=1.0),
                                    dict(do_sample=True, temperature=1e-3), dict(min_new_tokens=3),
                                    dict(num_beams=2, num_return_sequences=2, length_penalty=-1.0)])
def test_meaningful_edge_values_still_generate(model, kwargs):
    assert model.generate(PROMPT, **{"max_new_tokens": 3, **kwargs}).shape[1] == 6


@pytest.mark.parametrize("mask", [[[0, 0, 0]], [[1, 1, 1], [0, 0, 0]], [[0, 0, 0], [0, 1, 1]]])
def test_a_row_masked_out_entirely_is_refused(model, mask):
    mask = torch.tensor(mask)
    ids = PROMPT.expand(mask.shape[0], -1)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)


@pytest.mark.parametrize("bad", [64, -1, 10**9])
def test_ids_outside_the_vocabulary_are_a_value_error(model, bad):
    """transformers raises IndexError from inside torch's embedding for these."""
    ids = torch.tensor([[1, bad, 3]])
    with pytest.raises(IndexError):
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(ids, max_new_tokens=2)
