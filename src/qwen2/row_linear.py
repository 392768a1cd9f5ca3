"""Single-row linear products written for torch.compile on the CPU.

Decoding one sequence is memory-bound: each token reads every weight once. Written as a multiply-sum, the
product becomes an inductor reduction that streams the weight at close to memory bandwidth (measured
~30 GB/s on the default model's shapes vs ~15-18 for oneDNN's bf16 gemv), fused with any conversion of the
weight to float32 (int8 uses it too). Used by generation.fast's compiled decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Inductor's CPU sums over more than 4096 float32 elements go through a slower cascade-summation helper.
_MAX_ROW_CHUNK = 4096


def _float_once(x: Tensor) -> Tensor:
    # Materialise x in float32 once (as_strided forces inductor to), or inductor inlines x's producer (norm,
    # SiLU(gate) * up, the dtype conversion) into the reduction and recomputes it for every output feature.
    x = x.float()
    return x.as_strided(x.shape, x.stride())


def _chunks(k: int) -> int:
    """How many chunks a reduction over k is split into (inductor's CPU sums over more than 4096 elements are
    slower); `row_matvec` and `rows_matvec` must split alike to sum alike."""
    return next(c for c in range(1, k + 1) if k % c == 0 and k // c <= _MAX_ROW_CHUNK)


def _rounded(y: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """One rounding of the float32 sum (plus the bias) to the input's dtype, as F.linear."""
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def row_matvec(x: Tensor, weight: Tensor) -> Tensor:
    """`x @ weight.T` in float32 for a single row `x` (..., K) written as a multiply-sum, for torch.compile
    on the CPU: inductor turns it into one vectorised pass over the weight (any dtype it can convert to
    float32), fused with that conversion, at close to memory bandwidth."""
    x = _float_once(x)
    out_features, k = weight.shape
    chunks = _chunks(k)
    products = x.reshape(1, chunks, k // chunks) * weight.float().reshape(out_features, chunks, k // chunks)
    return products.sum(-1).sum(-1).reshape(*x.shape[:-1], out_features)


def row_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)` for a single row through `row_matvec`."""
    return _rounded(row_matvec(x, weight), bias, x.dtype)


def rows_matvec(x: Tensor, weight: Tensor) -> Tensor:
    """`row_matvec` for a few rows x (M, K) at once, for torch.compile on the CPU: each output element is the
    same multiply-sum as `row_matvec`'s (the same chunks, the same reduction over one weight row), with the
    weight row outermost, so the weight streams from memory once and each of its rows is reused from the L1
    cache by the M rows. Speculative decoding's verification uses it so that each row rounds as the one-row
    decode step does."""
    x = _float_once(x)
    rows, k = x.shape
    out_features = weight.shape[0]
    chunks = _chunks(k)
    products = x.reshape(1, rows, chunks, k // chunks) * weight.float().reshape(out_features, 1, chunks, k // chunks)
    return products.sum(-1).sum(-1).t()  # (out, M) -> (M, out)


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)` for x (..., K) of a few rows through `rows_matvec`, rounded as `row_linear`."""
    y = rows_matvec(x.reshape(-1, x.shape[-1]), weight)
    return _rounded(y, bias, x.dtype).reshape(*x.shape[:-1], weight.shape[0])
