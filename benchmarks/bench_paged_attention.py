"""Decode attention over a paged KV cache on the CPU: the ways to read blocks where they lie, timed on one
batch (16 rows, contexts 200-1,100 tokens, Qwen2.5-0.5B's heads: 14 query / 2 KV heads of 64), per layer.

    python benchmarks/bench_paged_attention.py [--threads 1] [--dtype bfloat16]

- our C++ kernel (the engine's, `qwen2.serving.paged_kernel`): one pass per (row, KV head) over the blocks
  where they lie;
- gather + per-row SDPA (the engine's fallback): one index_select of every row's blocks, then SDPA per row on
  a view of exactly its length (no mask: SDPA's fused kernel);
- gather + one masked SDPA over the padded batch;
- blockwise online softmax in torch ops: one table column at a time, no gathered context;
- FlexAttention (torch.compile) over the whole pool with a mask built from the block tables.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from qwen2.serving import paged_kernel
from qwen2.serving.attention import gathered_decode_attention

B, KV_HEADS, GROUP, DIM, BLOCK = 16, 2, 7, 64, 16


def _time(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~20 s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    lengths = torch.randint(200, 1100, (B,)).tolist()
    num_blocks = 1024
    keys = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, dtype=dtype)
    values = torch.randn_like(keys)
    order = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for length in lengths:
        count = -(-length // BLOCK)
        tables.append(order[used:used + count])
        used += count
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(B, KV_HEADS * GROUP, DIM, dtype=dtype)
    scale = DIM ** -0.5
    lengths_t = torch.tensor(lengths)
    if not paged_kernel.load():
        raise SystemExit("the paged decode attention kernel could not be built (see the warning above)")

    def masked_sdpa():
        k = keys.index_select(0, table.flatten()).view(B, -1, KV_HEADS, DIM).transpose(1, 2)
        v = values.index_select(0, table.flatten()).view(B, -1, KV_HEADS, DIM).transpose(1, 2)
        mask = (torch.arange(k.shape[2])[None, :] < lengths_t[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q.view(B, KV_HEADS, GROUP, DIM), k, v, attn_mask=mask, scale=scale)

    def blockwise():
        qf = q.view(B, KV_HEADS, GROUP, DIM).float()
        best = torch.full((B, KV_HEADS, GROUP), float("-inf"))
        total = torch.zeros(B, KV_HEADS, GROUP)
        acc = torch.zeros(B, KV_HEADS, GROUP, DIM)
        offsets = torch.arange(BLOCK)
        for j in range(width):
            kb = keys.index_select(0, table[:, j]).float()
            vb = values.index_select(0, table[:, j]).float()
            scores = torch.einsum("bhgd,bthd->bhgt", qf, kb) * scale
            valid = (j * BLOCK + offsets)[None, :] < lengths_t[:, None]
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
            new_best = torch.maximum(best, scores.amax(-1))
            correction = torch.nan_to_num(torch.exp(best - new_best))
            p = torch.nan_to_num(torch.exp(scores - new_best[..., None]))
            total = total * correction + p.sum(-1)
            acc = acc * correction[..., None] + torch.einsum("bhgt,bthd->bhgd", p, vb)
            best = new_best
        return (acc / total[..., None]).to(dtype)

    rows = {
        "C++ kernel over the blocks in place (engine)": lambda: paged_kernel.paged_decode(q, keys, values, table,
                                                                                          lengths_t, scale),
        "gather + per-row SDPA (engine's fallback)": lambda: gathered_decode_attention(q, keys, values, table,
                                                                                       lengths, scale),
        "gather + one masked SDPA": masked_sdpa,
        "blockwise online softmax (torch ops)": blockwise,
    }
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        logical = torch.full((B, num_blocks), -1, dtype=torch.long)
        for row, blocks in enumerate(tables):
            logical[row, blocks] = torch.arange(len(blocks))

        def mask_mod(b, h, q_idx, kv_idx):
            block = logical[q_idx, kv_idx // BLOCK]
            return (block >= 0) & (block * BLOCK + kv_idx % BLOCK < lengths_t[q_idx])

        pool_k = keys.permute(2, 0, 1, 3).reshape(1, KV_HEADS, -1, DIM)
        pool_v = values.permute(2, 0, 1, 3).reshape(1, KV_HEADS, -1, DIM)
        block_mask = create_block_mask(mask_mod, 1, 1, B, num_blocks * BLOCK, device="cpu", BLOCK_SIZE=(16, 128))
        compiled = torch.compile(flex_attention)
        start = time.perf_counter()
        compiled(q.transpose(0, 1)[None], pool_k, pool_v, block_mask=block_mask, enable_gqa=True, scale=scale)
        print(f"FlexAttention compile: {time.perf_counter() - start:.1f} s")
        rows["FlexAttention (compiled, whole pool + block mask)"] = lambda: compiled(
            q.transpose(0, 1)[None], pool_k, pool_v, block_mask=block_mask, enable_gqa=True, scale=scale)
    print(f"| decode attention, {B} rows, {args.dtype}, {args.threads} thread(s) | ms per layer |\n|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {_time(fn):.1f} |")


if __name__ == "__main__":
    main()
