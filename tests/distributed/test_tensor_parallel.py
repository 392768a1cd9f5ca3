"""Tensor parallelism (qwen2.distributed) over 2 and 4 gloo processes against the single-process model on the
same checkpoints, and transformers for the causal LM: logits of every head (also from a GGUF), greedy
generate(), bf16, int8, the refusals, and a killed rank."""

from __future__ import annotations

import pytest
import torch

from qwen2 import Qwen2Config
from qwen2.distributed import TensorParallelError, make_plan
from qwen2.heads import Qwen2ForSequenceClassification, Qwen2ForTokenClassification
from qwen2.model import Qwen2ForCausalLM

from tp_harness import TINY, run_ranks, save_checkpoints
from tp_worker import IDS, MASK, TIMEOUT, forward_logits, gguf_logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory.mktemp("tp_checkpoints"))


@pytest.fixture(scope="module")
def reference(checkpoints):
    """The single-process model's outputs on the same checkpoints (and transformers' logits of the LM)."""
    import transformers

    lm = Qwen2ForCausalLM.from_pretrained(checkpoints / "lm", dtype=torch.float32)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(checkpoints / "lm", dtype=torch.float32).eval()
    with torch.inference_mode():
        hf_logits = hf(IDS, attention_mask=MASK).logits.float()
    int8 = Qwen2ForCausalLM.from_pretrained(checkpoints / "lm", dtype=torch.float32, quantization="int8")
    return {
        "lm": forward_logits(lm), "hf": hf_logits,
        "greedy": lm.generate(IDS, attention_mask=MASK, max_new_tokens=12, do_sample=False, pad_token_id=0),
        "params": sum(p.numel() for p in lm.parameters()),
        "tied": forward_logits(Qwen2ForCausalLM.from_pretrained(checkpoints / "tied")),
        "seq": forward_logits(Qwen2ForSequenceClassification.from_pretrained(checkpoints / "seq")),
        "tok": forward_logits(Qwen2ForTokenClassification.from_pretrained(checkpoints / "tok")),
        "gguf": gguf_logits(Qwen2ForCausalLM.from_pretrained(checkpoints / "tiny.gguf")),
        "bf16": forward_logits(Qwen2ForCausalLM.from_pretrained(checkpoints / "lm", dtype=torch.bfloat16)),
        "int8": forward_logits(int8),
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_matches_single_process(checkpoints, reference, tmp_path, world_size):
    codes, ranks = run_ranks("check", checkpoints, tmp_path, world_size, timeout=TIMEOUT + 120)
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["lm"], reference["hf"], atol=1e-4, rtol=0)
        for head in ("lm", "tied", "seq", "tok")[:4 if world_size == 2 else 2]:
            torch.testing.assert_close(result[head], reference[head], atol=1e-4, rtol=0, msg=f"{head} rank {rank}")
        assert torch.equal(result["greedy"], reference["greedy"])
        assert "split over tensor-parallel ranks" in result["save_refused"]  # not a checkpoint of slices
        # Each rank holds its slices only: 1/N of the layers' and the vocabulary's weights, the norms whole.
        assert result["params"] < reference["params"] / world_size * 1.1
        heads_per_rank = TINY["num_attention_heads"] // world_size
        assert result["q_proj"] == (heads_per_rank * 8, TINY["hidden_size"])
        assert result["k_proj"] == (max(1, TINY["num_key_value_heads"] // world_size) * 8, TINY["hidden_size"])
        if world_size > 2:
            continue  # the classification heads, bf16 and int8 are checked over 2 ranks
        torch.testing.assert_close(result["gguf"], reference["gguf"], atol=1e-4, rtol=0)
        # bf16: the same computation in another summation order.
        assert result["bf16_dtype"] == torch.bfloat16
        torch.testing.assert_close(result["bf16"], reference["bf16"], atol=3e-2, rtol=3e-2)
        # int8: the row-wise slices get scales of their own, so the error against float32 is int8's, not more.
        assert result["int8_modules"] == 2 * 7 + 1
        single_error = (reference["int8"] - reference["lm"]).abs().max()
        assert (result["int8"] - reference["lm"]).abs().max() <= 1.5 * single_error + 1e-4
        assert torch.equal(result["int8"].argmax(-1), reference["int8"].argmax(-1))
    # Then the last rank exits; each other rank's next forward pass raises instead of hanging.
    assert codes == [0] * (world_size - 1) + [3]
    for result in ranks[:-1]:
        assert result["after_death"] is not None and "another tensor-parallel rank" in result["after_death"]
        assert result["seconds_to_fail"] <= TIMEOUT + 5


def test_splits_that_cannot_be_made_are_refused():
    default = Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                          vocab_size=151936)
    assert make_plan(default, 1, 2).num_kv_heads == 1
    tiny = Qwen2Config(**TINY)
    assert [make_plan(tiny, rank, 4).kv_head_start for rank in range(4)] == [0, 0, 1, 1]  # each kv head on 2 ranks
    with pytest.raises(ValueError, match=r"num_attention_heads=14 is not divisible by 4.*use: \[1, 2\]"):
        make_plan(default, 0, 4)
    three_kv = Qwen2Config(**{**TINY, "hidden_size": 96, "num_attention_heads": 12,
                                       "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="multiple of theirs"):
        make_plan(three_kv, 0, 4)


def test_tp_plan_outside_torchrun_names_the_launcher(checkpoints, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TensorParallelError, match="torchrun --nproc-per-node"):
        Qwen2ForCausalLM.from_pretrained(checkpoints / "lm", tp_plan="auto")
    with pytest.raises(ValueError, match="tp_plan='auto'"):
        Qwen2ForCausalLM.from_pretrained(checkpoints / "lm", tp_plan="colwise")
