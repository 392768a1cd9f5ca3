"""The decode step compiled once, saved and loaded (qwen2.generation.precompiled), on a tiny random model:
loading traces and compiles nothing, and an answer that switches from the eager step to the loaded one
mid-way gives the tokens of an eager greedy run (the oracle: generate() with compiling switched off)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from qwen2 import Qwen2Config, Qwen2ForCausalLM
from qwen2.generation import precompiled

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("precompiled") / "step.bin"
    precompiled.save(model, path)
    return model, path


class _SwitchAfter:
    """A streamer that installs the loaded step after `tokens` new tokens: the switch happens mid-answer."""

    def __init__(self, step: precompiled.PrecompiledDecodeStep, function, tokens: int) -> None:
        self.step, self.function, self.left = step, function, tokens + 1  # generate() puts the prompt first

    def put(self, value) -> None:
        self.left -= 1
        if self.left == 0:
            self.step.function = self.function

    def end(self) -> None:
        pass


def test_loading_compiles_nothing_and_switching_mid_answer_keeps_greedy_tokens(saved):
    model, path = saved
    assert path.stat().st_size > 0
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    mask = torch.ones_like(ids)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, disable_compile=True)

    traced = (counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"])
    function = precompiled.load(path)
    step = precompiled.install(model)
    switch = _SwitchAfter(step, function, tokens=10)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, streamer=switch)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert step.compiled_calls == 40 - 10  # new tokens 11 to 40 came from the loaded function
    assert (counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]) == traced  # no tracing

    # A model its guards refuse (bfloat16 weights: another graph) is decoded eagerly, not failed.
    other = copy.deepcopy(model).to(torch.bfloat16)
    expected = other.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, disable_compile=True)
    refused = precompiled.install(other)
    refused.function = function
    out = other.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert refused.compiled_calls == 0
