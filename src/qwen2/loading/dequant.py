"""Vectorised torch dequantisation of ggml blocks, one small function per block layout.

Each type has an `unpack_<type>(blocks)` that splits raw `(n_blocks, type_size)` uint8 blocks into
named integer fields (scales, mins, quants) and a `dequantize_<type>(blocks)` that combines them
into float32 `(n_blocks, block_size)`. The unpackers are the stable interface for code that turns
GGUF blocks straight into packed int4/int8 weights without a float32 round trip.

The float arithmetic follows gguf-py's reference (`gguf.quants`) operation by operation (each
product and sum rounded to float32 separately, no fused multiply-add), so the results are bitwise
equal to it; the layouts are ggml's `block_q*` structs in ggml-common.h.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Tensor = torch.Tensor
QK_K = 256  # elements per K-quant super-block

# IQ4_NL / IQ4_XS: the non-linear 4-bit code book (kvalues_iq4nl in ggml-common.h).
IQ4_VALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=torch.float32)


# ------------------------------------------------------------------------------------------- shared pieces

def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 stored at byte `start` of every block, as float32 `(n, 1)`."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _fields(packed: Tensor, bits: int, dim: int) -> Tensor:
    """Every `bits`-wide field of each byte, lowest first, stacked along a new axis `dim`.

    Shifts a contiguous copy by Python scalars: on CPU, shifting a strided view, or by a broadcast
    tensor of shift amounts, is several times slower.
    """
    packed = packed.contiguous()
    mask = (1 << bits) - 1
    return torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=dim)


def _split_nibbles(packed: Tensor, group: int) -> Tensor:
    """`(n, k)` bytes -> `(n, k // group, 2, group)`: per group of bytes, the low nibbles then the high ones."""
    return _fields(packed.reshape(packed.shape[0], -1, group), 4, dim=2)


def _split_crumbs(packed: Tensor, group: int) -> Tensor:
    """`(n, k)` bytes -> `(n, k // group, 4, group)`: per group of bytes, bits 0-1, then 2-3, 4-5, 6-7."""
    return _fields(packed.reshape(packed.shape[0], -1, group), 2, dim=2)


def _split_bits(packed: Tensor, group: int) -> Tensor:
    """`(n, k)` bytes -> `(n, k // group, 8, group)`: bit b of each byte becomes plane b (ggml's qh/hmask)."""
    return _fields(packed.reshape(packed.shape[0], -1, group), 1, dim=2)


def _bits32(packed: Tensor) -> Tensor:
    """A little-endian uint32 bitfield stored as `(n, 4)` bytes -> `(n, 32)` bits, bit j at column j."""
    return _fields(packed, 1, dim=2).reshape(packed.shape[0], 32)


# ------------------------------------------------------------------------------------ 32-element blocks

class Q4_0Blocks(NamedTuple):
    d: Tensor  # (n, 1) float32 scale
    q: Tensor  # (n, 32) uint8 in 0..15; value = (q - 8) * d


def unpack_q4_0(blocks: Tensor) -> Q4_0Blocks:
    # block_q4_0: f16 d | 16 bytes; element j < 16 in the low nibble of byte j, j >= 16 in the high one
    return Q4_0Blocks(_f16(blocks, 0), _split_nibbles(blocks[:, 2:18], 16).reshape(-1, 32))


def dequantize_q4_0(blocks: Tensor) -> Tensor:
    d, q = unpack_q4_0(blocks)
    return q.float().sub_(8).mul_(d)


class Q4_1Blocks(NamedTuple):
    d: Tensor  # (n, 1) float32 scale
    m: Tensor  # (n, 1) float32 offset
    q: Tensor  # (n, 32) uint8 in 0..15; value = q * d + m


def unpack_q4_1(blocks: Tensor) -> Q4_1Blocks:
    # block_q4_1: f16 d | f16 m | 16 bytes of nibbles as in Q4_0
    return Q4_1Blocks(_f16(blocks, 0), _f16(blocks, 2), _split_nibbles(blocks[:, 4:20], 16).reshape(-1, 32))


def dequantize_q4_1(blocks: Tensor) -> Tensor:
    d, m, q = unpack_q4_1(blocks)
    return q.float().mul_(d).add_(m)


class Q5_0Blocks(NamedTuple):
    d: Tensor  # (n, 1) float32 scale
    q: Tensor  # (n, 32) uint8 in 0..31; value = (q - 16) * d


def unpack_q5_0(blocks: Tensor) -> Q5_0Blocks:
    # block_q5_0: f16 d | u32 qh (5th bit of element j = bit j) | 16 bytes of low nibbles as in Q4_0
    low = _split_nibbles(blocks[:, 6:22], 16).reshape(-1, 32)
    return Q5_0Blocks(_f16(blocks, 0), low | (_bits32(blocks[:, 2:6]) << 4))


def dequantize_q5_0(blocks: Tensor) -> Tensor:
    d, q = unpack_q5_0(blocks)
    return q.float().sub_(16).mul_(d)


class Q5_1Blocks(NamedTuple):
    d: Tensor  # (n, 1) float32 scale
    m: Tensor  # (n, 1) float32 offset
    q: Tensor  # (n, 32) uint8 in 0..31; value = q * d + m


def unpack_q5_1(blocks: Tensor) -> Q5_1Blocks:
    # block_q5_1: f16 d | f16 m | u32 qh | 16 bytes of low nibbles
    low = _split_nibbles(blocks[:, 8:24], 16).reshape(-1, 32)
    return Q5_1Blocks(_f16(blocks, 0), _f16(blocks, 2), low | (_bits32(blocks[:, 4:8]) << 4))


def dequantize_q5_1(blocks: Tensor) -> Tensor:
    d, m, q = unpack_q5_1(blocks)
    return q.float().mul_(d).add_(m)


class Q8_0Blocks(NamedTuple):
    d: Tensor  # (n, 1) float32 scale (stored as float16)
    q: Tensor  # (n, 32) int8; value = q * d


def unpack_q8_0(blocks: Tensor) -> Q8_0Blocks:
    # block_q8_0: f16 d | 32 int8
    return Q8_0Blocks(_f16(blocks, 0), blocks[:, 2:34].view(torch.int8))


def dequantize_q8_0(blocks: Tensor) -> Tensor:
    d, q = unpack_q8_0(blocks)
    return q.float().mul_(d)


class IQ4_NLBlocks(NamedTuple):
    d: Tensor  # (n, 1) float32 scale
    q: Tensor  # (n, 32) uint8 index into IQ4_VALUES; value = IQ4_VALUES[q] * d


def unpack_iq4_nl(blocks: Tensor) -> IQ4_NLBlocks:
    # block_iq4_nl: f16 d | 16 bytes of nibbles as in Q4_0
    return IQ4_NLBlocks(_f16(blocks, 0), _split_nibbles(blocks[:, 2:18], 16).reshape(-1, 32))


def dequantize_iq4_nl(blocks: Tensor) -> Tensor:
    d, q = unpack_iq4_nl(blocks)
    return d * IQ4_VALUES.to(q.device)[q.long()]


# ------------------------------------------------------------------------- 256-element K-quant super-blocks

def k_scale_min(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> `(scales, mins)`, each `(n, 8)` uint8.

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3, 8-11 the low nibbles of scales 4-7 and the
    high nibbles of mins 4-7, whose top 2 bits sit in the spare bits of bytes 0-3 and 4-7.
    """
    n = packed.shape[0]
    sc, mn, both = packed.reshape(n, 3, 4).unbind(1)
    scales = torch.cat([sc & 0x3F, (both & 0x0F) | ((sc >> 2) & 0x30)], dim=-1)
    mins = torch.cat([mn & 0x3F, (both >> 4) | ((mn >> 2) & 0x30)], dim=-1)
    return scales, mins


class Q2_KBlocks(NamedTuple):
    d: Tensor  # (n, 1) float32 super-block scale
    dmin: Tensor  # (n, 1) float32 super-block min scale
    scales: Tensor  # (n, 16) uint8 4-bit sub-block scales
    mins: Tensor  # (n, 16) uint8 4-bit sub-block mins
    q: Tensor  # (n, 16, 16) uint8 in 0..3; value = d*scale*q - dmin*min


def unpack_q2_k(blocks: Tensor) -> Q2_KBlocks:
    # block_q2_K: 16 bytes scales (low nibble scale, high nibble min) | 64 bytes of 2-bit quants | f16 d | f16 dmin
    n = blocks.shape[0]
    packed = blocks[:, :16]
    q = _split_crumbs(blocks[:, 16:80], 32).reshape(n, 16, 16)
    return Q2_KBlocks(_f16(blocks, 80), _f16(blocks, 82), packed & 0x0F, packed >> 4, q)


def _scale_min(d: Tensor, dmin: Tensor, scales: Tensor, mins: Tensor, q: Tensor) -> Tensor:
    """The k-quants with a min per sub-block (Q2_K, Q4_K, Q5_K): value = d*scale*q - dmin*min."""
    dl = (d * scales.float()).unsqueeze(-1)
    ml = (dmin * mins.float()).unsqueeze(-1)
    return q.float().mul_(dl).sub_(ml).reshape(-1, QK_K)


def dequantize_q2_k(blocks: Tensor) -> Tensor:
    return _scale_min(*unpack_q2_k(blocks))


class Q3_KBlocks(NamedTuple):
    d: Tensor  # (n, 1) float32 super-block scale
    scales: Tensor  # (n, 16) int8 6-bit sub-block scales, already minus 32
    q: Tensor  # (n, 16, 16) int8 in -4..3; value = d * scale * q


def unpack_q3_k(blocks: Tensor) -> Q3_KBlocks:
    # block_q3_K: 32 bytes hmask | 64 bytes of low 2 bits | 12 bytes of 6-bit scales | f16 d
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low = _fields(packed[:, :8], 4, dim=1).reshape(n, 16)
    high = _fields(packed[:, 8:12], 2, dim=1).reshape(n, 16)
    scales = (low | (high << 4)).view(torch.int8) - 32
    q_low = _split_crumbs(blocks[:, 32:96], 32).reshape(n, 16, 16)
    # A set hmask bit means "no offset"; a clear one subtracts 4.
    q_high = _split_bits(blocks[:, :32], 32).reshape(n, 16, 16) ^ 1
    q = q_low.view(torch.int8) - (q_high << 2).view(torch.int8)
    return Q3_KBlocks(_f16(blocks, 108), scales, q)


def dequantize_q3_k(blocks: Tensor) -> Tensor:
    d, scales, q = unpack_q3_k(blocks)
    return q.float().mul_((d * scales.float()).unsqueeze(-1)).reshape(-1, QK_K)


class Q4_KBlocks(NamedTuple):
    d: Tensor  # (n, 1) float32 super-block scale
    dmin: Tensor  # (n, 1) float32 super-block min scale
    scales: Tensor  # (n, 8) uint8 6-bit sub-block scales
    mins: Tensor  # (n, 8) uint8 6-bit sub-block mins
    q: Tensor  # (n, 8, 32) uint8 in 0..15; value = d*scale*q - dmin*min


def unpack_q4_k(blocks: Tensor) -> Q4_KBlocks:
    # block_q4_K: f16 d | f16 dmin | 12 bytes scales/mins | 128 bytes: per 32 bytes, sub-block 2i low nibbles, 2i+1 high
    n = blocks.shape[0]
    scales, mins = k_scale_min(blocks[:, 4:16])
    q = _split_nibbles(blocks[:, 16:144], 32).reshape(n, 8, 32)
    return Q4_KBlocks(_f16(blocks, 0), _f16(blocks, 2), scales, mins, q)


def dequantize_q4_k(blocks: Tensor) -> Tensor:
    return _scale_min(*unpack_q4_k(blocks))


class Q5_KBlocks(NamedTuple):
    d: Tensor  # (n, 1) float32 super-block scale
    dmin: Tensor  # (n, 1) float32 super-block min scale
    scales: Tensor  # (n, 8) uint8 6-bit sub-block scales
    mins: Tensor  # (n, 8) uint8 6-bit sub-block mins
    q: Tensor  # (n, 8, 32) uint8 in 0..31; value = d*scale*q - dmin*min


def unpack_q5_k(blocks: Tensor) -> Q5_KBlocks:
    # block_q5_K: as Q4_K with 32 bytes qh (bit i of byte j = 5th bit of sub-block i, element j) before the nibbles
    n = blocks.shape[0]
    scales, mins = k_scale_min(blocks[:, 4:16])
    low = _split_nibbles(blocks[:, 48:176], 32).reshape(n, 8, 32)
    high = _split_bits(blocks[:, 16:48], 32).reshape(n, 8, 32)
    return Q5_KBlocks(_f16(blocks, 0), _f16(blocks, 2), scales, mins, low | (high << 4))


def dequantize_q5_k(blocks: Tensor) -> Tensor:
    return _scale_min(*unpack_q5_k(blocks))


class Q6_KBlocks(NamedTuple):
    d: Tensor  # (n, 1) float32 super-block scale
    scales: Tensor  # (n, 16) int8 sub-block scales
    q: Tensor  # (n, 16, 16) int8 in -32..31; value = d * scale * q


def unpack_q6_k(blocks: Tensor) -> Q6_KBlocks:
    # block_q6_K: 128 bytes low nibbles | 64 bytes of high 2 bits | 16 int8 scales | f16 d
    n = blocks.shape[0]
    low = _split_nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
    high = _split_crumbs(blocks[:, 128:192], 32).reshape(n, 8, 32)
    q = (low | (high << 4)).view(torch.int8) - 32
    return Q6_KBlocks(_f16(blocks, 208), blocks[:, 192:208].view(torch.int8), q.reshape(n, 16, 16))


def dequantize_q6_k(blocks: Tensor) -> Tensor:
    d, scales, q = unpack_q6_k(blocks)
    return q.float().mul_((d * scales.float()).unsqueeze(-1)).reshape(-1, QK_K)


class IQ4_XSBlocks(NamedTuple):
    d: Tensor  # (n, 1) float32 super-block scale
    scales: Tensor  # (n, 8) int8 6-bit sub-block scales, already minus 32
    q: Tensor  # (n, 8, 32) uint8 index into IQ4_VALUES; value = d * scale * IQ4_VALUES[q]


def unpack_iq4_xs(blocks: Tensor) -> IQ4_XSBlocks:
    # block_iq4_xs: f16 d | u16 scales_h (2 bits per sub-block) | 4 bytes scales_l (nibbles) | 128 bytes of nibbles
    n = blocks.shape[0]
    scales_h = blocks[:, 2].int() | (blocks[:, 3].int() << 8)
    high = torch.stack([(scales_h >> shift) & 3 for shift in range(0, 16, 2)], dim=-1)
    low = _fields(blocks[:, 4:8], 4, dim=2).reshape(n, 8)
    scales = (low | (high.to(torch.uint8) << 4)).view(torch.int8) - 32
    q = _split_nibbles(blocks[:, 8:136], 16).reshape(n, 8, 32)
    return IQ4_XSBlocks(_f16(blocks, 0), scales, q)


def dequantize_iq4_xs(blocks: Tensor) -> Tensor:
    d, scales, q = unpack_iq4_xs(blocks)
    return ((d * scales.float()).unsqueeze(-1) * IQ4_VALUES.to(q.device)[q.long()]).reshape(-1, QK_K)


# ----------------------------------------------------------------------------------------- float types

def dequantize_f32(blocks: Tensor) -> Tensor:
    return blocks.contiguous().view(torch.float32)


def dequantize_f16(blocks: Tensor) -> Tensor:
    return blocks.contiguous().view(torch.float16).float()


def dequantize_bf16(blocks: Tensor) -> Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


T = GGMLQuantizationType
DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
    T.F32: dequantize_f32, T.F16: dequantize_f16, T.BF16: dequantize_bf16,
    T.Q4_0: dequantize_q4_0, T.Q4_1: dequantize_q4_1, T.Q5_0: dequantize_q5_0, T.Q5_1: dequantize_q5_1,
    T.Q8_0: dequantize_q8_0, T.Q2_K: dequantize_q2_k, T.Q3_K: dequantize_q3_k, T.Q4_K: dequantize_q4_k,
    T.Q5_K: dequantize_q5_k, T.Q6_K: dequantize_q6_k, T.IQ4_NL: dequantize_iq4_nl, T.IQ4_XS: dequantize_iq4_xs,
}
SUPPORTED_TYPES = frozenset(DEQUANTIZERS)
# Elements per call: each chunk's half-dozen intermediates then stay in cache instead of streaming
# through memory once per operation (about 25% less CPU than 16 M-element chunks on the default model).
_CHUNK_ELEMENTS = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    """One thread per torch thread, each running whole chunks with single-threaded torch ops.

    torch's intra-op parallelism splits every small op across threads and meets at a barrier after
    each; on a busy machine that made dequantisation 10x slower in wall time, while whole chunks per
    thread scale cleanly. OpenMP keeps its thread count per thread, but `torch.set_num_threads` also sets
    the count every thread started later begins with: the caller sets its own again afterwards, or every
    later thread ran at 1 (the chat's background compile then built a decode step for 1 thread that the
    chat's 2-thread calls were refused by its guards).
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            threads = torch.get_num_threads()
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="qwen2-dequant", initializer=_single_threaded)
            barrier = threading.Barrier(threads)
            list(_pool.map(lambda _: barrier.wait(timeout=10), range(threads)))  # start every worker now
            torch.set_num_threads(threads)  # the default of threads started from now on, and this one's
        return _pool


def _single_threaded() -> None:
    torch.set_num_threads(1)
    torch.get_num_threads()  # fixes this thread's count now, before the caller restores the default


def dequantize(blocks: Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """Raw `(n_blocks, type_size)` uint8 blocks of a `ggml_type` tensor -> a `dtype` tensor of `shape`.

    With `out` (contiguous, `shape`'s element count, any floating dtype) the values are written there
    instead, chunk by chunk, so filling a bfloat16 parameter never holds a float32 copy of it.
    """
    fn = DEQUANTIZERS.get(ggml_type)
    if fn is None:
        raise NotImplementedError(f"dequantising ggml type {ggml_type.name} is not supported; supported: "
                                  f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))}")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = blocks.reshape(-1, type_size)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    elif out.numel() != blocks.shape[0] * block_size or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of {blocks.shape[0] * block_size} elements, "
                         f"not {tuple(out.shape)}")
    rows = out.view(-1, block_size)
    step = max(1, _CHUNK_ELEMENTS // block_size)

    def run(start: int) -> None:
        rows[start:start + step] = fn(blocks[start:start + step]).reshape(-1, block_size)

    starts = range(0, blocks.shape[0], step)
    if blocks.device.type != "cpu":  # queued asynchronously on the device already
        for start in starts:
            run(start)
    else:
        for done in [_workers().submit(run, start) for start in starts]:
            done.result()
    return out.view(shape)
