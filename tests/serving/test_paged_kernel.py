"""The paged decode attention kernel against attention computed in float64 from the same blocks (softmax of
scaled dot products over each row's first `length` positions, in table order), and against the engine's
torch path (gather + SDPA)."""

from __future__ import annotations

import pytest
import torch

from qwen2.serving import paged_kernel
from qwen2.serving.attention import decode_attention, gathered_decode_attention

BLOCK, KV_HEADS, GROUP, DIM = 16, 2, 7, 64


@pytest.fixture(scope="module", autouse=True)
def _built():
    if not paged_kernel.load():
        pytest.fail("the paged decode attention kernel did not build (see the warning)")


def _reference(q, keys, values, tables, lengths, scale):
    out = torch.empty(q.shape, dtype=torch.float64)
    group_size = q.shape[1] // keys.shape[2]
    for row, length in enumerate(lengths.tolist()):
        positions = torch.arange(length)
        blocks = tables[row, positions // BLOCK]
        k = keys[blocks, positions % BLOCK].double()  # (L, Hkv, D)
        v = values[blocks, positions % BLOCK].double()
        for head in range(q.shape[1]):
            group = head // group_size
            scores = (k[:, group] @ q[row, head].double()) * scale
            out[row, head] = torch.softmax(scores, 0) @ v[:, group]
    return out


# The default model's heads (2 KV heads of 7 queries, 64 wide), then shapes that take the kernel's other paths:
# a 128-wide head; more than 8 queries per KV head (its heads go 8 at a time, the last group partial); a head
# size compiled at run time, not a multiple of 8 (its dimensions' tail).
SHAPES = [(KV_HEADS, GROUP, DIM), (2, 4, 128), (1, 12, 32), (3, 1, 36)]


@pytest.mark.parametrize("kv_heads, group, dim", SHAPES)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_equals_attention_over_the_blocks(dtype, atol, kv_heads, group, dim):
    generator = torch.Generator().manual_seed(0)
    num_blocks = 64
    keys = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=generator).to(dtype)
    lengths = torch.tensor([1, 16, 17, 100, 5 * BLOCK, 203])  # one token, block edges, partial blocks
    order = torch.randperm(num_blocks, generator=generator)  # blocks scattered through the pool
    width = -(-int(lengths.max()) // BLOCK)
    tables = torch.zeros(len(lengths), width, dtype=torch.long)
    used = 0
    for row, length in enumerate(lengths.tolist()):
        count = -(-length // BLOCK)
        tables[row, :count] = order[used:used + count]
        used += count
    q = (3 * torch.randn(len(lengths), kv_heads * group, dim, generator=generator)).to(dtype)  # peaked softmaxes
    scale = dim ** -0.5

    out = paged_kernel.paged_decode(q, keys, values, tables, lengths, scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), _reference(q, keys, values, tables, lengths, scale), atol=atol, rtol=0)
    torch.testing.assert_close(decode_attention(q, keys, values, tables, lengths, scale), out, atol=0, rtol=0)
    torch.testing.assert_close(out, gathered_decode_attention(q, keys, values, tables, lengths.tolist(), scale),
                               atol=atol, rtol=0)


def test_kernel_refuses_reads_outside_the_table_or_the_pool():
    keys = torch.zeros(4, BLOCK, KV_HEADS, DIM)
    q = torch.zeros(1, KV_HEADS * GROUP, DIM)
    with pytest.raises(RuntimeError, match="a length beyond its table"):
        paged_kernel.paged_decode(q, keys, keys, torch.zeros(1, 2, dtype=torch.long), torch.tensor([33]), 1.0)
    with pytest.raises(RuntimeError, match="a block id outside the pool"):
        paged_kernel.paged_decode(q, keys, keys, torch.tensor([[0, 4]]), torch.tensor([17]), 1.0)
    wide = torch.zeros(1, BLOCK, 1, 264)
    with pytest.raises(RuntimeError, match="head size above 256"):
        paged_kernel.paged_decode(torch.zeros(1, 1, 264), wide, wide, torch.zeros(1, 1, dtype=torch.long),
                                  torch.tensor([1]), 1.0)
