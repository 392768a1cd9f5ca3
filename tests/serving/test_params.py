"""SamplingParams validation: vLLM's defaults and meanings; bad values name the field."""

import pytest

from qwen2 import SamplingParams


def test_defaults_match_vllm():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (1, 1.0, 1.0, 0, 16)
    assert not params.greedy and SamplingParams(temperature=0).greedy


def test_normalisation():
    params = SamplingParams(stop="###", top_k=-1, logit_bias={"42": 500, 7: -3.5})
    assert params.stop == ["###"] and params.top_k == 0
    assert params.logit_bias == {42: 100.0, 7: -3.5}  # OpenAI's [-100, 100] clamp


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", 0),
    ("min_tokens", -1), ("logprobs", -1), ("prompt_logprobs", -1), ("seed", 1.5), ("temperature", float("nan")),
    ("stop", [""]), ("stop_token_ids", [-1]), ("logit_bias", {"x": 1.0}), ("n", True),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
