"""Tiny random models and an engine factory for the serving tests (a module of helpers, not a conftest:
a second conftest module would shadow tests/conftest.py for `from conftest import ...`)."""

from __future__ import annotations

import pytest
import torch

import qwen2
from qwen2.serving.attention import KVCache
from qwen2.serving.engine import EngineConfig, LLMEngine

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
)


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> qwen2.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**TINY)).eval().to(dtype)


def block_bytes(model, block_size: int = 16) -> int:
    c = model.config
    dtype = model.get_input_embeddings().weight.dtype
    return KVCache.bytes_per_block(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim, dtype)


def make_engine(model, tokenizer=None, blocks: int = 1024, **config) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=blocks * block_bytes(model), **config))


def run_to_end(engine: LLMEngine, max_steps: int = 100_000) -> dict:
    """Step until idle; the final RequestOutput of every request by id."""
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    raise AssertionError("the engine did not finish")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def greedy_reference(model, prompt: list[int], new_tokens: int, eos: int | None = None):
    """generate()'s greedy tokens for `prompt` alone (up to its first eos), and at each step the gap between
    the two best logits."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos) + 1]
    gaps = [float(step[0].float().topk(2).values.diff().abs()) for step in out.logits]
    return tokens, gaps


def assert_same_greedy(got: list[int], reference: tuple[list[int], list[float]], tie: float = 0.0) -> None:
    """Token for token, except that in 16-bit arithmetic a step whose two best logits are within `tie` (a
    rounding step of a batched product) may pick either; the sequences may differ from there on."""
    tokens, gaps = reference
    for i, (ours, theirs) in enumerate(zip(got, tokens)):
        if ours != theirs:
            assert gaps[i] <= tie, f"token {i}: {ours} != {theirs} with a logit gap of {gaps[i]}"
            return
    assert len(got) == len(tokens)
