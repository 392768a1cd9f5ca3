"""The paged KV cache's tensors and attention over them.

Keys and values of every layer live in (num_blocks, block_size, kv_heads, head_dim) tensors; a sequence's
block table lists the blocks holding its positions in order. New keys/values are written to their slots
(block * block_size + offset) before attention, so a chunk attends to itself and its whole context.

Decode rows read their blocks where they lie with a C++ kernel of ours (`paged_kernel`, CPU, float32 or
bfloat16). Elsewhere, or if it cannot be built, they share one gather of their blocks into a (rows,
blocks * block_size) key tensor and each row attends to a view of exactly its length, each query group
folded onto the length axis as the model's own decode path does (no repeated keys); reading blocks in place
with torch operations (a blockwise online softmax, or FlexAttention over the whole pool) measured slower
still on the CPU (benchmarks/README.md). A prefill chunk attends to its sequence's blocks with a causal
offset mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qwen2.serving import paged_kernel


class KVCache:
    """Per-layer key and value blocks; `write` stores a step's keys/values and returns the layer's tensors."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Uninitialised: a slot is read only after its token's keys/values are written (views stop at each
        # sequence's length), and untouched pages cost no memory until the cache fills.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        heads, dim = keys.shape[2:]
        keys.view(-1, heads, dim).index_copy_(0, slots, k.to(keys.dtype))
        values.view(-1, heads, dim).index_copy_(0, slots, v.to(values.dtype))
        return keys, values


def _gather(blocks: Tensor, tables: Tensor) -> Tensor:
    """(..., n * block_size, kv_heads, head_dim) keys or values of the blocks listed in `tables` (..., n).
    `index_select` on the flattened table: ~10x faster on the CPU than advanced indexing with the 2-D table."""
    gathered = blocks.index_select(0, tables.reshape(-1))  # (B * n, block_size, H, D)
    return gathered.view(*tables.shape[:-1], -1, *blocks.shape[2:])


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, tables: Tensor, lengths: Tensor,
                     scale: float) -> Tensor:
    """One query per row: q (B, H, D), tables (B, max_blocks), lengths (B,) int64 on the CPU -> (B, H, D)."""
    if (q.device.type == "cpu" and q.dtype == keys.dtype == values.dtype
            and q.dtype in (torch.float32, torch.bfloat16) and paged_kernel.load()):
        return paged_kernel.paged_decode(q, keys, values, tables, lengths, scale)
    return gathered_decode_attention(q, keys, values, tables, lengths.tolist(), scale)


def gathered_decode_attention(q: Tensor, keys: Tensor, values: Tensor, tables: Tensor, lengths: list[int],
                              scale: float) -> Tensor:
    """`decode_attention` in torch operations: the blocks are gathered in one call; SDPA then runs per row
    on a view of exactly its length: without a mask it takes its fused kernel and skips the padding (as fast
    or faster than one masked call over the padded batch on the CPU; benchmarks/bench_paged_attention.py)."""
    rows, heads, dim = q.shape
    k = _gather(keys, tables).transpose(1, 2)  # (B, Hkv, S, D)
    v = _gather(values, tables).transpose(1, 2)
    kv_heads = k.shape[1]
    packed = q.reshape(rows, kv_heads, heads // kv_heads, dim)  # each query group on the length axis
    out = torch.empty_like(packed)
    for row, length in enumerate(lengths):
        out[row] = F.scaled_dot_product_attention(packed[row:row + 1], k[row:row + 1, :, :length].to(q.dtype),
                                                  v[row:row + 1, :, :length].to(q.dtype), scale=scale)[0]
    return out.reshape(rows, heads, dim)


def prefill_attention(q: Tensor, keys: Tensor, values: Tensor, table: Tensor, start: int, scale: float) -> Tensor:
    """A chunk of one sequence: q (T, H, D) at positions start.. start+T-1, table (num_blocks,) -> (T, H, D)."""
    length, heads, dim = q.shape
    end = start + length
    k = _gather(keys, table)[:end].transpose(0, 1)[None]  # (1, Hkv, end, D)
    v = _gather(values, table)[:end].transpose(0, 1)[None]
    qh = q.transpose(0, 1)[None]  # (1, H, T, D)
    if start == 0:
        out = F.scaled_dot_product_attention(qh, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        positions = torch.arange(start, end, device=q.device)
        mask = torch.arange(end, device=q.device)[None, :] <= positions[:, None]  # (T, end)
        out = F.scaled_dot_product_attention(qh, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                             enable_gqa=True)
    return out[0].transpose(0, 1)
