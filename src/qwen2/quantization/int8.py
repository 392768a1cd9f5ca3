"""int8 weights, one symmetric scale per output channel: weight-only (activations stay in floating point), or
W8A8 with each input row quantised to int8 as it arrives (`Int8DynamicActivationLinear`).

Modelled on gpt-fast's `WeightOnlyInt8Linear`. For decoding (a few rows) on CPU the matmul is the VNNI row
kernel (qwen2.quantization.kernels: the rows quantised to int16, integer dot products) where the CPU has it,
else PyTorch's fused `torch._weight_int8pack_mm` (reads the int8 weight once, scales in registers); anywhere
else it is the portable `F.linear(x, w.to(dtype)) * scales`, which computes the same thing and which inductor
fuses on GPU. Prompts (many rows) dequantise the weight once and use the dense GEMM, which is faster there.

`torch._weight_int8pack_mm` needs care: its AVX-512/AVX2 kernels use aligned vector loads, so the input rows
and the weight must start on a 32-byte boundary and `in_features` must be a multiple of 16. Unaligned
memory crashes the process (measured on torch 2.13), it does not raise. The weight is therefore re-allocated
when a load leaves it unaligned (an mmap'd checkpoint can), and unaligned inputs are copied.

W8A8 exists for prompts: a prompt's GEMMs are compute-bound, and on a CPU with VNNI `torch._int_mm` does twice
the multiply-adds per second of the bf16 GEMM (810-860 vs 400-440 GOP/s on 2 AVX-512 cores, measured on the
default model's shapes). Decoding is bound by reading the weight, which is int8 either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen2.quantization import kernels
from qwen2.row_linear import row_matvec

QMAX = 127
# Alignment of the CPU kernel's vector loads, in bytes (AVX-512 loads 32 bytes of bf16 input at a time).
_ALIGN = 32
_K_MULTIPLE = 16
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ROW_CHUNK = 8192
_DEQUANTIZE_FROM_ROWS = 32
_COMPILED_ROWDOT_ROWS = kernels.ROWS_PER_WEIGHT_PASS  # one pass of the VNNI kernel over the weight
_INT_MM_FROM_ROWS = 8  # w8a8: from 8 rows torch._int_mm matches the VNNI row kernel (0.26 vs 0.2-0.39 ms)


def quantize_int8(weight: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """(int8 weight, scales) with `weight ~= q * scales[:, None]`, one scale per output row.

    The codes are rounded against the scales as stored (`scale_dtype`), so storing them loses nothing more.
    """
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    for lo in range(0, weight.shape[0], _ROW_CHUNK):  # chunks bound the float32 temporaries
        hi = min(lo + _ROW_CHUNK, weight.shape[0])
        w = weight[lo:hi].detach().float()
        s = (w.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
        q[lo:hi] = torch.round(w / s.float()[:, None]).clamp_(-QMAX - 1, QMAX).to(torch.int8)
        scales[lo:hi] = s
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight the int8 codes stand for (the reference the fast kernel must match)."""
    return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def quantize_rows(x: Tensor, dtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """(integer codes, float32 scales (rows, 1)) with `x ~= codes * scales`: one symmetric scale per row of a
    2-D x. int8 for W8A8; int16 for the VNNI row kernel's input.

    Per row (per token) rather than per tensor: a few outlier channels then cost one token's precision, not
    the whole prompt's."""
    if dtype == torch.int8 and kernels.eager_usable(x):
        return kernels.quantize_rows(x)
    # Written as separate same-dtype passes: eager mixed-dtype arithmetic (bf16 / float32) and
    # vector_norm(inf) take the slow paths, 8x slower at 512 x 4864 (measured).
    qmax = torch.iinfo(dtype).max
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=torch.finfo(torch.float32).tiny) / qmax
    return x.to(torch.float32, copy=True).div_(scales).round_().to(dtype), scales


def _is_aligned(t: Tensor) -> bool:
    return t.data_ptr() % _ALIGN == 0


class Int8WeightOnlyLinear(nn.Module):
    """Drop-in for `nn.Linear` holding an int8 `weight` (out, in) and per-row `scales` in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        dtype = linear.weight.dtype
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", dtype=dtype)
        module.weight, module.scales = quantize_int8(linear.weight, scale_dtype=dtype)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    def _use_cpu_kernel(self, x: Tensor) -> bool:
        return (x.device.type == "cpu" and self.weight.device.type == "cpu"
                and self.scales.dtype in _KERNEL_DTYPES and self.in_features % _K_MULTIPLE == 0)

    def _decoding_rows_use_rowdot(self, x2: Tensor) -> bool:
        """Whether these rows go to the VNNI kernel: up to 8 compiled rows (a decode step's one row, speculative
        decoding's verification rows: the kernel's per-row arithmetic does not depend on the row count), or
        eager rows, the kernels then built on first use."""
        if x2.device.type != "cpu":
            return False
        ready = x2.shape[0] <= _COMPILED_ROWDOT_ROWS if torch.compiler.is_compiling() else kernels.eager_usable(x2)
        return ready and kernels.usable(self.weight)

    def _scaled_rowdot(self, codes: Tensor, row_scales: Tensor, dtype: torch.dtype) -> Tensor:
        """The VNNI kernel's product of int16 row codes and the weight, scaled back to `dtype`."""
        return (kernels.rowdot(codes, self.weight) * row_scales * self.scales.float()).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if self._rows_kernel_takes(x2):
            out = kernels.int8_rows(x2, self.weight, self.scales, self.bias, self._ROW_CODES_MAX)
        else:
            out = self._matmul(x2)
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    _ROW_CODES_MAX = 32767  # decoding rows are quantised to int16 codes for the VNNI kernels

    def _rows_kernel_takes(self, x2: Tensor) -> bool:
        """Whether these eager rows go to `kernels.int8_rows` (quantised, multiplied, scaled and biased in one
        call: as the torch operations of `_matmul`'s row kernel path, ~40% of a 16-row step, measured). Not
        float32 rows: their int16 rounding is below a 16-bit float's, not float32's."""
        return (x2.dtype == torch.bfloat16 and x2.shape[0] < _DEQUANTIZE_FROM_ROWS and self._eager_rows_kernel(x2))

    def _eager_rows_kernel(self, x2: Tensor) -> bool:
        return (not torch.compiler.is_compiling() and x2.dtype == self.scales.dtype
                and (self.bias is None or self.bias.dtype == x2.dtype) and self._decoding_rows_use_rowdot(x2))

    def _matmul(self, x2: Tensor) -> Tensor:
        """x2 (rows, in) in the scales' dtype times the dequantised weight, without the bias."""
        dtype = self.scales.dtype
        if x2.shape[0] >= _DEQUANTIZE_FROM_ROWS:
            # Prefill: the fused kernel is compute-bound in float32 and grows linearly with the rows; one pass
            # to dequantise and the bf16 GEMM is faster from ~24 rows on (2.6x at 512 rows, measured).
            out = F.linear(x2, self.weight * self.scales[:, None])  # int8 * scales promotes: one pass, no temporary
        elif dtype != torch.float32 and self._decoding_rows_use_rowdot(x2):
            # Integer dot products, memory-bound (qwen2.quantization.kernels). Not for float32, whose rows
            # would lose precision to the int16 rounding (below a 16-bit float's own, not float32's).
            out = self._scaled_rowdot(*quantize_rows(x2, torch.int16), dtype)
        elif torch.compiler.is_compiling() and x2.shape[0] == 1 and x2.device.type == "cpu":
            # inductor's fused int8 -> float32 reduction streams the weight ~1.5-2x faster than the packed
            # kernel on the large shapes (see qwen2.row_linear.row_matvec).
            out = (row_matvec(x2, self.weight) * self.scales.float()).to(dtype)
        elif self._use_cpu_kernel(x2):
            x2 = x2.contiguous()
            if not torch.compiler.is_compiling() and not _is_aligned(x2):
                x2 = x2.clone()
            out = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        else:
            out = F.linear(x2, self.weight.to(dtype)) * self.scales
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # `load_state_dict(assign=True)` may hand us an mmap'd, unaligned tensor: the CPU kernel would crash on it.
        w = self.weight
        if w.device.type == "cpu" and w.numel() and (not w.is_contiguous() or not _is_aligned(w)):
            self.weight = w.contiguous().clone()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8DynamicActivationLinear(Int8WeightOnlyLinear):
    """W8A8: the weight of `Int8WeightOnlyLinear` (same tensors, same checkpoints) times int8 input rows,
    each quantised with its own scale on every call. On the CPU a call is one integer GEMM (`torch._int_mm`);
    below 8 rows (and for a compiled single row) the codes go to the VNNI row kernel as they are (int8 codes
    are int16 codes), or without it compiled single rows take int8's fused float reduction (38 vs 32 tok/s
    for `_int_mm` in the graph). Off the CPU: the weight-only path on the codes, which a float input holds
    exactly."""

    _ROW_CODES_MAX = QMAX  # int8 codes, which the int16 kernels take as they are

    def _rows_kernel_takes(self, x2: Tensor) -> bool:
        return x2.shape[0] < _INT_MM_FROM_ROWS and self._eager_rows_kernel(x2)

    def _matmul(self, x2: Tensor) -> Tensor:
        codes, row_scales = quantize_rows(x2)
        if x2.shape[0] < _INT_MM_FROM_ROWS and self._decoding_rows_use_rowdot(x2):
            return self._scaled_rowdot(codes.to(torch.int16), row_scales, x2.dtype)  # exact, as _int_mm's
        single_compiled_row = torch.compiler.is_compiling() and x2.shape[0] == 1
        if x2.device.type == "cpu" and not single_compiled_row:
            products = torch._int_mm(codes, self.weight.t())  # int32: exact
            if kernels.eager_usable(x2):
                return kernels.scale_products(products, row_scales, self.scales.float(), x2.dtype)
            return products.float().mul_(row_scales).mul_(self.scales.float()).to(x2.dtype)
        return super()._matmul(codes.to(x2.dtype)) * row_scales.to(x2.dtype)
