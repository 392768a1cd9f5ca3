"""Which slice of each weight a rank holds under tensor parallelism, and which configurations can be split.

The plan is Megatron's, as gpt-fast's tp.py applies it: q/k/v and gate/up are split by output features
(column-wise, each rank computes whole heads / a slice of the MLP's hidden units), o_proj and down_proj by
input features (row-wise, each rank's partial sums are all-reduced), the embedding and lm_head by vocabulary
rows. When there are fewer key/value heads than ranks, each key/value head is replicated on the ranks whose
query heads attend to it; that needs every rank's query heads to sit in one key/value group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROW_WISE = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Shard:
    """Rows (dim 0) or columns (dim 1) [start, start + length) of a checkpoint tensor, held in `padded` rows
    (only the vocabulary is padded, so the last rank's slice has the others' size; the pad rows are zero)."""

    dim: int
    start: int
    length: int
    padded: int


@dataclass(frozen=True)
class TensorParallelPlan:
    rank: int
    world_size: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # key/value heads on this rank
    kv_head_start: int  # first key/value head this rank holds
    intermediate: int  # MLP hidden units on this rank
    vocab_start: int
    vocab_per_rank: int  # rows of this rank's embedding and lm_head (the last rank's are padded)
    vocab_size: int

    def shard(self, name: str, config: Any) -> Shard | None:
        """The slice of checkpoint tensor `name` this rank holds; None for tensors every rank holds whole
        (norms, classification heads)."""
        parts = name.split(".")
        owner, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
        head_dim = config.head_dim
        if owner == "q_proj":
            return _rows(self.rank * self.num_heads * head_dim, self.num_heads * head_dim)
        if owner in ("k_proj", "v_proj"):
            return _rows(self.kv_head_start * head_dim, self.num_kv_heads * head_dim)
        if owner in ("gate_proj", "up_proj"):
            return _rows(self.rank * self.intermediate, self.intermediate)
        if owner == "o_proj" and kind == "weight":
            width = self.num_heads * head_dim
            return Shard(1, self.rank * width, width, width)
        if owner == "down_proj" and kind == "weight":
            return Shard(1, self.rank * self.intermediate, self.intermediate, self.intermediate)
        if (owner, kind) in (("embed_tokens", "weight"), ("lm_head", "weight")):
            length = max(0, min(self.vocab_per_rank, self.vocab_size - self.vocab_start))
            return Shard(0, self.vocab_start, length, self.vocab_per_rank)
        return None


def _rows(start: int, length: int) -> Shard:
    return Shard(0, start, length, length)


def make_plan(config: Any, rank: int, world_size: int) -> TensorParallelPlan:
    """The plan for `rank` of `world_size`, or a ValueError naming the dimension that cannot be split."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    problems = []
    if heads % world_size:
        problems.append(f"num_attention_heads={heads} is not divisible by {world_size}")
    if kv_heads >= world_size and kv_heads % world_size:
        problems.append(f"num_key_value_heads={kv_heads} is not divisible by {world_size}")
    if kv_heads < world_size and world_size % kv_heads:
        problems.append(f"{world_size} ranks cannot share num_key_value_heads={kv_heads} evenly (to replicate "
                        f"key/value heads the rank count must be a multiple of theirs)")
    if config.intermediate_size % world_size:
        problems.append(f"intermediate_size={config.intermediate_size} is not divisible by {world_size}")
    if problems:
        divisors = [n for n in range(1, heads + 1) if heads % n == 0 and config.intermediate_size % n == 0
                    and (kv_heads % n == 0 if kv_heads >= n else n % kv_heads == 0)]
        raise ValueError(f"This model cannot be split over {world_size} tensor-parallel ranks: "
                         f"{'; '.join(problems)}. Rank counts it can use: {divisors}")
    local_kv = max(1, kv_heads // world_size)
    kv_start = rank * kv_heads // world_size  # replicated heads: ranks r*kv/N share head floor(r*kv/N)
    vocab_per_rank = -(-config.vocab_size // world_size)
    return TensorParallelPlan(rank=rank, world_size=world_size, num_heads=heads // world_size,
                              num_kv_heads=local_kv, kv_head_start=kv_start,
                              intermediate=config.intermediate_size // world_size,
                              vocab_start=rank * vocab_per_rank, vocab_per_rank=vocab_per_rank,
                              vocab_size=config.vocab_size)
