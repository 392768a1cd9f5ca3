"""Tiny checkpoints and a launcher for the tensor-parallel tests: each rank is a process of its own running
tp_worker.py (gloo on loopback, one thread each), as torchrun would start it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

import qwen2
from qwen2.distributed.launch import launch, stop
from qwen2.heads import Qwen2ForSequenceClassification, Qwen2ForTokenClassification
from test_gguf import write_tiny_gguf

WORKER = Path(__file__).resolve().parent / "tp_worker.py"
# 8 query / 2 key-value heads: over 2 ranks the kv heads are split, over 4 each is replicated on two ranks.
# A vocabulary of 130 does not divide by 4: the last rank's embedding and lm_head slices are padded.
TINY = dict(vocab_size=130, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False,
            rope_theta=10000.0)


def save_checkpoints(root: Path) -> Path:
    """float32 safetensors checkpoints (a causal LM with an untied and a tied head, the two classification
    heads) and a GGUF."""
    builds = {"lm": (qwen2.Qwen2ForCausalLM, {}), "tied": (qwen2.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
              "seq": (Qwen2ForSequenceClassification, {"num_labels": 3}),
              "tok": (Qwen2ForTokenClassification, {"num_labels": 5})}
    for seed, (name, (cls, extra)) in enumerate(builds.items()):
        torch.manual_seed(seed)
        cls(qwen2.Qwen2Config(**{**TINY, **extra})).float().eval().save_pretrained(root / name)
    write_tiny_gguf(root / "tiny.gguf")  # quantised blocks: slices read through the GGUF reader
    return root


def run_ranks(task: str, root: Path, out: Path, world_size: int, timeout: float) -> tuple[list[int], list[dict]]:
    """Run tp_worker.py TASK on `world_size` ranks: their exit codes and what each saved. A rank that hangs
    past `timeout` fails the test."""
    out.mkdir(parents=True, exist_ok=True)
    processes = launch([str(WORKER), task, str(root), str(out)], world_size, threads=1)
    try:
        codes = [p.wait(timeout) for p in processes]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a rank of {task!r} hung for more than {timeout} s") from None
    finally:
        stop(processes)
    return codes, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
