"""The several-row decode kernels (qwen2.quantization.kernels.bf16_rows / int8_rows): bf16 within float32
rounding of the float64 product of the same bf16 inputs, int8 bit for bit the exact integer product scaled as
the torch operations it replaces; which eager linears take them, and the fallbacks without the ISA."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwen2.generation import fast
from qwen2.quantization import Int8DynamicActivationLinear, Int8WeightOnlyLinear, kernels
from qwen2.quantization.int8 import quantize_rows

from conftest import cpu_flags, require_int8_kernels

needs_bf16_rows = pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="no AVX512-BF16 on this CPU")


def assert_bf16_rows_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """got within the float32 rounding of K / 16 + 6 additions of |x| . |w| (+ |bias|), plus one bf16 rounding,
    of the float64 product of the same bf16 values."""
    exact = x.double() @ w.double().t()
    magnitude = x.double().abs() @ w.double().abs().t()
    if bias is not None:
        exact, magnitude = exact + bias.double(), magnitude + bias.double().abs()
    bound = 2.0 ** -8 * exact.abs() + (x.shape[-1] / 16 + 6) * 2.0 ** -24 * magnitude * 1.01
    error = (got.double() - exact).abs()
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert (error <= bound).all(), f"largest error / bound: {(error / bound).max():.3f}"


@needs_bf16_rows
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16])  # 9, 16: a pass of 8 rows, then a second over the tile
@pytest.mark.parametrize("n, k", [(1, 32), (37, 100), (300, 896), (19, 4864), (19, 2100)])  # 100: a masked last
# chunk; 4864, 2100: blocks of K (from 2 rows), 2100 with a masked last chunk
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_rows_is_the_product_within_float32_rounding(rows, n, k, bias):
    require_int8_kernels()
    x = torch.randn(rows, k).to(torch.bfloat16)
    w = (torch.randn(n, k) * torch.exp(torch.randn(n, 1))).to(torch.bfloat16)  # rows of very different scale
    b = torch.randn(n).to(torch.bfloat16) if bias else None
    assert_bf16_rows_close(torch.ops.qwen2_rows.bf16_rows(x, w, b), x, w, b)


@needs_bf16_rows
def test_bf16_rows_takes_non_contiguous_rows_and_leading_dims():
    require_int8_kernels()
    x = torch.randn(3, 2, 200).to(torch.bfloat16)[..., :96]  # strided rows
    w = torch.randn(40, 96).to(torch.bfloat16)
    got = kernels.bf16_rows(x, w, None)
    assert got.shape == (3, 2, 40)
    assert_bf16_rows_close(got.reshape(6, 40), x.reshape(6, 96), w, None)


@needs_bf16_rows
@pytest.mark.parametrize("k", [896, 2100, 4864])  # 2100, 4864: blocks of K from 2 rows on, 2100 a masked last chunk
def test_row_kernels_give_a_row_the_same_bits_whatever_rows_share_the_call(k):
    """What eager speculative verification and the serving engine's steps rely on: a row's output does not depend
    on how many rows (1..16) the call has nor on the row's place among them. Oracle: the rows of one 16-row call."""
    require_int8_kernels()
    x = torch.randn(16, k).to(torch.bfloat16)
    w, b = torch.randn(70, k).to(torch.bfloat16), torch.randn(70).to(torch.bfloat16)
    k8 = k // 32 * 32
    w8, s8 = torch.randint(-128, 128, (70, k8), dtype=torch.int8), (torch.rand(70) / 100).to(torch.bfloat16)
    bf16_all = torch.ops.qwen2_rows.bf16_rows(x, w, b)
    int8_all = kernels.int8_rows(x[:, :k8], w8, s8, b, 32767)
    for rows in range(1, 17):
        for start in {0, 16 - rows, (16 - rows) // 2}:
            part = slice(start, start + rows)
            assert torch.equal(torch.ops.qwen2_rows.bf16_rows(x[part], w, b), bf16_all[part]), (rows, start)
            assert torch.equal(kernels.int8_rows(x[part, :k8], w8, s8, b, 32767), int8_all[part]), (rows, start)


def _int8_reference(x, w, scales, bias, qmax):
    """The torch operations the kernel replaces, with the dot products exact (int64)."""
    codes, row_scales = quantize_rows(x, torch.int16 if qmax == 32767 else torch.int8)
    exact = codes.long() @ w.long().t()
    out = (exact.float() * row_scales * scales.float()).to(x.dtype)
    return out if bias is None else out + bias


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 16])
@pytest.mark.parametrize("n, k", [(1, 32), (37, 896), (300, 4864)])  # 4864: ten 512-column int32 chunks
@pytest.mark.parametrize("dtype, qmax", [(torch.bfloat16, 32767), (torch.bfloat16, 127), (torch.float32, 127)])
def test_int8_rows_is_the_exact_product_scaled_as_torch_operations(rows, n, k, dtype, qmax):
    require_int8_kernels()
    x = (torch.randn(rows, k) * torch.exp(torch.randn(rows, 1))).to(dtype)
    x[0, : k // 2] = -3.0  # row 0's codes mostly -qmax, times weight row 0 at -128: the largest chunk sums
    x[-1] = 0.0 if rows > 1 else x[-1]  # an all-zero row: the smallest scale
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    w[0] = -128
    scales = (torch.rand(n) / 100).to(dtype)
    for bias in (None, torch.randn(n).to(dtype)):
        got = kernels.int8_rows(x, w, scales, bias, qmax)
        assert torch.equal(got, _int8_reference(x, w, scales, bias, qmax))


@pytest.mark.parametrize("cls, rows", [(Int8WeightOnlyLinear, 5), (Int8WeightOnlyLinear, 16),
                                       (Int8DynamicActivationLinear, 7)])
def test_int8_layers_decode_rows_through_one_kernel_call(cls, rows):
    """Eager bf16 decoding rows take int8_rows (nothing else computes), with its integer reference's bits."""
    require_int8_kernels()
    linear = nn.Linear(96, 50, dtype=torch.bfloat16).requires_grad_(False)
    layer = cls.from_linear(linear)
    x = torch.randn(rows, 1, 96).to(torch.bfloat16)
    with mock.patch.object(layer, "_matmul", side_effect=AssertionError("the unfused path ran")):
        got = layer(x)
    reference = _int8_reference(x[:, 0], layer.weight, layer.scales, layer.bias, layer._ROW_CODES_MAX)
    assert torch.equal(got[:, 0], reference)


def test_int8_rows_refuse_bad_input():
    require_int8_kernels()
    w, s = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, dtype=torch.bfloat16)
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="K % 32 == 0"):
        kernels.int8_rows(x[:, :48], w[:, :48], s, None, 32767)
    with pytest.raises(RuntimeError, match="scales of N elements"):
        kernels.int8_rows(x, w, s.float(), None, 32767)
    with pytest.raises(RuntimeError, match="qmax"):
        kernels.int8_rows(x, w, s, None, 40000)


class _Counting(fast.DecodeLinears):
    """DecodeLinears counting the calls that reached bf16_rows and oneDNN."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = self.onednn = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        with mock.patch.object(kernels, "bf16_rows", side_effect=self._rows), \
                mock.patch.object(torch.ops.mkldnn, "_linear_pointwise", side_effect=self._onednn):
            return super().__torch_function__(func, types, args, kwargs)

    def _rows(self, *args):
        self.rows += 1
        return torch.ops.qwen2_rows.bf16_rows(args[0].reshape(-1, args[0].shape[-1]), *args[1:]).reshape(
            *args[0].shape[:-1], args[1].shape[0])

    def _onednn(self, *args):
        self.onednn += 1
        return F.linear(*args[:3])


@needs_bf16_rows
@pytest.mark.parametrize("shape, rows_kernel", [((1, 64), True), ((8, 1, 64), True), ((16, 64), True),
                                                ((17, 64), False), ((512, 64), False)])
def test_decode_linears_send_up_to_16_bf16_rows_to_the_row_kernel(shape, rows_kernel):
    require_int8_kernels()
    linear = nn.Linear(64, 40, dtype=torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.no_grad(), _Counting() as mode:
        got = linear(x)
    assert (mode.rows, mode.onednn) == ((1, 0) if rows_kernel else (0, 1))
    assert_bf16_rows_close(got.reshape(-1, 40), x.reshape(-1, 64), linear.weight.detach(), linear.bias.detach())


@needs_bf16_rows
def test_decode_linears_keep_onednn_without_avx512_bf16_or_the_setting_and_f_linear_with_grad(monkeypatch):
    require_int8_kernels()
    linear = nn.Linear(64, 40, dtype=torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    with torch.no_grad(), mock.patch.object(kernels, "_cpu_has_bf16", return_value=False), _Counting() as mode:
        linear(x)
    assert (mode.rows, mode.onednn) == (0, 1)
    with torch.no_grad(), mock.patch.object(fast.settings, "row_kernels", False), _Counting() as mode:
        linear(x)
    assert (mode.rows, mode.onednn) == (0, 1)
    with _Counting() as mode:
        linear(x).sum().backward()
    assert (mode.rows, mode.onednn) == (0, 0) and linear.weight.grad is not None
    monkeypatch.setattr(kernels, "load", lambda: False)  # no extension (no compiler): oneDNN
    with torch.no_grad(), _Counting() as mode:
        linear(x)
    assert (mode.rows, mode.onednn) == (0, 1)
