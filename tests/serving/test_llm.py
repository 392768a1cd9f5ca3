"""The offline LLM API and every weight format through the same runner: quantised tiny models (int8, int4,
w8a8) give generate()'s greedy tokens on the same quantised model."""

from __future__ import annotations

import pytest
import torch

from qwen2 import LLM, SamplingParams
from qwen2.quantization import quantize_model

from engine_harness import assert_same_greedy, greedy_reference, make_engine, tiny_model, tiny  # noqa: F401 (a fixture)


def _generate_alone(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()


def test_llm_generate_keeps_the_prompts_order(tiny):
    llm = LLM.from_engine(make_engine(tiny, max_waiting=2))  # more prompts than the queue holds
    prompts = [[5, 6, 7], list(range(3, 90)), [11] * 30, [4, 4], list(range(40, 60))]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=True)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == _generate_alone(tiny, prompt, 7)
        assert output.finished and output.metrics.first_token_time >= output.metrics.arrival_time


def test_llm_rejects_mismatched_params(tiny):
    llm = LLM.from_engine(make_engine(tiny))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[5, 6]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text", use_tqdm=False)


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantised_models_greedy_equals_generate(scheme, dtype):
    model = quantize_model(tiny_model(dtype, seed=7), scheme, group_size=32 if scheme == "int4" else None)
    engine = make_engine(model, max_num_batched_tokens=32)
    prompts = [list(range(3, 70)), [5, 6, 7], [9] * 20, list(range(30, 50))]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    tie = 0.0 if dtype == torch.float32 else 4e-3  # bfloat16: one rounding step of a logit near 0.5
    for i, prompt in enumerate(prompts):
        assert_same_greedy(finished[str(i)].outputs[0].token_ids, greedy_reference(model, prompt, 10), tie)
