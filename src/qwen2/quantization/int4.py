"""Weight-only int4: asymmetric, one (scale, zero) pair per group of 32/64/128/256 input columns.

Modelled on gpt-fast's `WeightOnlyInt4Linear` (tinygemm semantics): a code q in 0..15 stands for
`(q - 8) * scale + zero`, with `scales_and_zeros` laid out (in_features // group_size, out_features, 2).

Three layouts of the same 4-bit codes:
- plain: uint8 (out, in // 2), column 2j in the low nibble and 2j+1 in the high one. This is what state dicts
  and checkpoints hold, because it is the same on every machine.
- vnni: the layout of the AVX512-VNNI kernel (`int4_kernel`: the rows quantised to int8, integer dot
  products), for bf16 modules on a CPU where that kernel builds.
- cpu: what `torch._convert_weight_to_int4pack_for_cpu` produces for `torch._weight_int4pack_mm_for_cpu`,
  for the other dtypes or CPUs. It depends on the CPU's vector width (AVX-512 and AVX2 interleave
  differently).
The two CPU layouts are private and never saved: a module on the CPU packs on load, unpacks when its state dict
is taken, and packs again when its device or dtype no longer fits the layout (eagerly, at the next call).
Off the CPU the module dequantises and calls `F.linear`: slower, but the same arithmetic everywhere. On the
CPU, prompts of at least `_DEQUANTIZE_FROM_ROWS` rows do the same (dequantised straight from the packed
layout): torch's kernel dequantises the weight again for every 4 rows, so from ~128 rows one dequantisation and
the dense bf16 GEMM are faster (1.8x at 512 rows on the default model's shapes, measured). The VNNI kernel stays
faster than the bf16 GEMM itself to at least 256 rows, so with its layout only longer prompts dequantise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen2.quantization import int4_kernel

GROUP_SIZES = (32, 64, 128, 256)
# The CPU packing works on independent blocks of 16, 32 or 64 rows (by vector width); 64 is a multiple of each.
_CPU_BLOCK_ROWS = 64
_ROW_CHUNK = 4096  # a multiple of _CPU_BLOCK_ROWS: bounds the float32/int32 temporaries for the 151936-row lm_head
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DEQUANTIZE_FROM_ROWS = 128
# The VNNI kernel's integer products outrun the bf16 GEMM itself (1.3-1.7x at 8-256 rows on the default
# model's shapes, 2.6-37x dequantise + GEMM; measured), so its layout keeps it up to 256 rows.
_VNNI_DEQUANTIZE_FROM_ROWS = 257
# Range shrink factors tried per group; 1.0 (plain min/max) first, so the search can only lower the error.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_SEARCH_ELEMENTS = 1 << 18  # weights per chunk of the clip search: its float32 temporaries stay in L2


def check_shape(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why a (out, in) weight cannot be int4-quantised with `group_size`, or None if it can."""
    if group_size not in GROUP_SIZES:
        return f"group_size={group_size} is not one of {GROUP_SIZES}"
    if in_features % group_size:
        return f"in_features={in_features} is not a multiple of group_size={group_size}"
    if out_features % 16:
        return f"out_features={out_features} is not a multiple of 16 (the packed CPU kernel's requirement)"
    return None


def quantize_int4(weight: Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16,
                  clip_ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[Tensor, Tensor]:
    """(codes uint8 (out, in) in 0..15, scales_and_zeros (in // group_size, out, 2)) for a 2-D float weight.

    Each group maps a range onto 0..15: its [min, max] shrunk by each of `clip_ratios`, keeping the one with
    the smallest squared error (clipping a rare outlier buys a finer step for the rest; llama.cpp's k-quants
    and AWQ search the same way). Codes are rounded against the scale and zero as stored in `scale_dtype`,
    so keeping them in that dtype adds no error of its own.
    """
    n, k = weight.shape
    problem = check_shape(n, k, group_size)
    if problem:
        raise ValueError(f"Cannot quantise a ({n}, {k}) weight to int4: {problem}")
    groups = k // group_size
    codes = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales_and_zeros = torch.empty(groups, n, 2, dtype=scale_dtype, device=weight.device)
    ratios = torch.tensor(clip_ratios, dtype=torch.float32, device=weight.device)
    rows = max(1, _SEARCH_ELEMENTS // k)  # small chunks keep the search's temporaries in cache
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        w = weight[lo:hi].detach().float().view(hi - lo, groups, group_size)
        wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
        best_error, best_ratio = None, None
        for ratio in ratios:
            q, scale, zero = _quantize_range(w, wmin * ratio, wmax * ratio, scale_dtype)
            error = q.sub_(8).mul_(scale.float()[..., None]).add_(zero.float()[..., None]).sub_(w).square_().sum(-1)
            if best_error is None:
                best_error, best_ratio = error, torch.full_like(error, float(ratio))
            else:
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                best_ratio = torch.where(better, ratio, best_ratio)
        q, scale, zero = _quantize_range(w, wmin * best_ratio, wmax * best_ratio, scale_dtype)
        codes[lo:hi] = q.view(hi - lo, k).to(torch.uint8)
        scales_and_zeros[:, lo:hi, 0] = scale.t()
        scales_and_zeros[:, lo:hi, 1] = zero.t()
    return codes, scales_and_zeros


def _quantize_range(w: Tensor, low: Tensor, high: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Float codes 0..15 for w (rows, groups, group_size) on the grid spanning [low, high] per group."""
    scale = ((high - low) / 15).clamp(min=1e-6).to(scale_dtype)
    zero = (low + 8 * scale.float()).to(scale_dtype)
    lowest = zero.float() - 8 * scale.float()  # the value code 0 stands for
    q = ((w - lowest[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15)
    return q, scale, zero


def dequantize_int4(codes: Tensor, scales_and_zeros: Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight that codes (out, in) stand for: the reference the fast kernel must match."""
    return _scale_codes(codes.to(torch.float32, copy=True), scales_and_zeros, group_size).to(dtype)


def _scale_codes(codes: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """float32 codes (out, in) -> `(q - 8) * scale + zero`, in place."""
    n, k = codes.shape
    sz = scales_and_zeros.to(torch.float32)
    scale = sz[..., 0].t()[..., None]  # (out, groups, 1)
    zero = sz[..., 1].t()[..., None]
    return codes.view(n, k // group_size, group_size).sub_(8).mul_(scale).add_(zero).view(n, k)


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 (out, in) codes -> plain uint8 (out, in // 2): even columns in the low nibble."""
    return (codes[:, 0::2] & 15) | ((codes[:, 1::2] & 15) << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Plain uint8 (out, in // 2) -> uint8 codes (out, in)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def _unpack_cpu_blocks(packed: Tensor, block: int, out: Tensor) -> Tensor:
    """Codes (out, in) of a CPU-packed weight laid out as torch's vectorised kernels pack it: blocks of
    `block` output rows, stored (rows // block, in, block // 2) with the block's first half in the low
    nibbles and its second half in the high ones. Written into `out` (any dtype the codes convert to)."""
    n, k = out.shape
    half = block // 2
    blocks = packed.view(n // block, k, half)
    codes = out.view(n // block, block, k)
    codes[:, :half] = (blocks & 15).transpose(1, 2)
    codes[:, half:] = (blocks >> 4).transpose(1, 2)
    return out


@functools.cache
def _cpu_block_rows() -> int | None:
    """Rows per block of this torch build's CPU packing if it is the halves layout `_unpack_cpu_blocks` reads
    (64 with AVX-512, 32 with AVX2), found by packing a test weight; None for any other layout."""
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block in (64, 32):
        if torch.equal(_unpack_cpu_blocks(packed, block, torch.empty(128, 64, dtype=torch.int32)), codes):
            return block
    return None


@functools.lru_cache(maxsize=32)
def _cpu_layout_source(rows: int, k: int) -> Tensor:
    """For each nibble of the CPU-packed (rows, k) block (plain nibble order), the flat row * k + col it holds.

    Found by asking the packing op itself: pack the base-16 digits of every element's index, one digit per call,
    and read the digits back. This stays right whatever interleaving this build of torch uses.
    """
    count = rows * k
    index = torch.arange(count, dtype=torch.int64)
    source = torch.zeros(count, dtype=torch.int64)
    for shift in range(0, max(count - 1, 1).bit_length(), 4):
        digit = ((index >> shift) & 15).to(torch.int32).view(rows, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        source |= unpack_nibbles(packed).reshape(-1).to(torch.int64) << shift
    return source


def to_cpu_layout(plain: Tensor) -> Tensor:
    """Plain (out, in // 2) -> the layout `torch._weight_int4pack_mm_for_cpu` reads."""
    out = torch.empty_like(plain)
    for lo in range(0, plain.shape[0], _ROW_CHUNK):  # row blocks are packed independently
        hi = min(lo + _ROW_CHUNK, plain.shape[0])
        codes = unpack_nibbles(plain[lo:hi]).to(torch.int32)
        out[lo:hi] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return out


def from_cpu_layout(packed: Tensor) -> Tensor:
    """Inverse of `to_cpu_layout`; plain indexing, so it also runs after the tensor moved to another device."""
    return pack_nibbles(_cpu_layout_codes(packed, torch.uint8))


def _cpu_layout_codes(packed: Tensor, dtype: torch.dtype) -> Tensor:
    """Codes (out, in) of a CPU-packed weight, as `dtype`: unpacked block by block where this build uses the
    halves layout, else gathered through `_cpu_layout_source` (slower, but right for any interleaving)."""
    n, half_k = packed.shape
    k = 2 * half_k
    codes = torch.empty(n, k, dtype=dtype, device=packed.device)
    block = _cpu_block_rows()
    if block is not None and n % block == 0:
        return _unpack_cpu_blocks(packed, block, codes)
    full = n - n % _CPU_BLOCK_ROWS
    for lo, hi in ((0, full), (full, n)):
        if hi == lo:
            continue
        rows = min(hi - lo, _CPU_BLOCK_ROWS)
        source = _cpu_layout_source(rows, k).to(packed.device)
        nibbles = unpack_nibbles(packed[lo:hi].reshape(-1, rows * half_k))  # (blocks, rows * k)
        block_codes = torch.empty_like(nibbles)
        block_codes[:, source] = nibbles
        codes[lo:hi] = block_codes.view(hi - lo, k)
    return codes


def to_vnni_layout(plain: Tensor) -> Tensor:
    """Plain (out, in // 2) -> the layout of `int4_kernel` (same shape and bytes): per block of 16 rows, per 8
    columns, 64 bytes, byte 4 * i + j holding row i's column j in its low nibble and column j + 4 in its high."""
    n, half = plain.shape
    rows = int4_kernel.ROWS
    out = torch.empty_like(plain)
    for lo in range(0, n, _ROW_CHUNK):  # bounds the unpacked temporaries for the 151936-row lm_head
        hi = min(lo + _ROW_CHUNK, n)
        codes = unpack_nibbles(plain[lo:hi]).view((hi - lo) // rows, rows, half // 4, 2, 4)
        codes = codes.permute(0, 2, 1, 4, 3)  # block, 8 columns, row, j, nibble
        out[lo:hi] = (codes[..., 0] | (codes[..., 1] << 4)).reshape(hi - lo, half)
    return out


def from_vnni_layout(packed: Tensor) -> Tensor:
    """Inverse of `to_vnni_layout`."""
    return pack_nibbles(_vnni_layout_codes(packed, torch.uint8))


def _vnni_layout_codes(packed: Tensor, dtype: torch.dtype) -> Tensor:
    """Codes (out, in) of a weight in `int4_kernel`'s layout, as `dtype`."""
    n, half = packed.shape
    rows = int4_kernel.ROWS
    blocks = packed.view(n // rows, half // 4, rows, 4).transpose(1, 2)  # block, row, 8 columns, j
    codes = torch.empty(n, 2 * half, dtype=dtype, device=packed.device)
    view = codes.view(n // rows, rows, half // 4, 2, 4)
    view[:, :, :, 0] = blocks & 15
    view[:, :, :, 1] = blocks >> 4
    return codes


class Int4WeightOnlyLinear(nn.Module):
    """Drop-in for `nn.Linear` holding 4-bit `weight` codes and per-group `scales_and_zeros`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        problem = check_shape(out_features, in_features, group_size)
        if problem:
            raise ValueError(f"Int4WeightOnlyLinear({in_features}, {out_features}): {problem}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                             dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self._layout = "plain"

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4WeightOnlyLinear:
        dtype = linear.weight.dtype
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                     device="meta", dtype=dtype)
        codes, module.scales_and_zeros = quantize_int4(linear.weight, group_size, scale_dtype=dtype)
        module.weight = pack_nibbles(codes)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        module._pack_for_cpu()
        return module

    def plain_weight(self) -> Tensor:
        """The codes in the portable layout, whatever layout the module runs with."""
        if self._layout == "cpu":
            return from_cpu_layout(self.weight)
        return from_vnni_layout(self.weight) if self._layout == "vnni" else self.weight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight, read straight from whichever layout the module holds (no plain round trip)."""
        if self._layout == "cpu":
            codes = _cpu_layout_codes(self.weight, torch.float32)
        elif self._layout == "vnni":
            codes = _vnni_layout_codes(self.weight, torch.float32)
        else:
            codes = unpack_nibbles(self.weight).to(torch.float32)
        return _scale_codes(codes, self.scales_and_zeros, self.group_size).to(dtype)

    def _fitting_layout(self) -> str:
        """The layout for where the module is now: plain off the CPU; on it, the VNNI kernel's for bf16 where
        that kernel builds, else torch's (its first call builds the kernel: about a minute, once per machine)."""
        if self.weight.device.type != "cpu":
            return "plain"
        if int4_kernel.takes(self.in_features, self.out_features, self.group_size, self.scales_and_zeros.dtype):
            return "vnni"
        return "cpu"

    def _pack_for_cpu(self) -> None:
        """Repack the codes into the layout that fits (a no-op when they are in it)."""
        layout = self._fitting_layout()
        if layout != self._layout:
            plain = self.plain_weight()
            self.weight = {"cpu": to_cpu_layout, "vnni": to_vnni_layout}.get(layout, lambda w: w)(plain)
            self._layout = layout

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():  # moved to another device or dtype since it was packed
            self._pack_for_cpu()
        dtype = self.scales_and_zeros.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)
        on_cpu = x2.device.type == "cpu" and self.weight.device.type == "cpu"
        rows = x2.shape[0]
        if on_cpu and rows < _VNNI_DEQUANTIZE_FROM_ROWS and self._layout == "vnni" and dtype == int4_kernel.DTYPE:
            out = int4_kernel.linear(x2, self.weight, self.scales_and_zeros, self.group_size, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if on_cpu and rows < _DEQUANTIZE_FROM_ROWS and self._layout == "cpu" and dtype in _KERNEL_DTYPES:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.group_size,
                                                            self.scales_and_zeros)
        else:
            out = F.linear(x2, self.dequantize(dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.plain_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:  # checkpoints always hold the plain layout: pack it afresh
            self._layout = "plain"
            self._pack_for_cpu()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")
