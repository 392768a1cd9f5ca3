"""The AVX512-VNNI int4 kernel (qwen2.quantization.int4_kernel): its activation codes are the Q8_0 rounding
written out in float32 torch operations; its products equal an exact float64 evaluation of those codes times the
dequantised weight up to float32 sums and the bf16 output, and the unquantised product within the activations'
worst-case rounding; the layout round-trips, the module's saved form stays plain and a load repacks; without the
kernel int4 keeps torch's; compiled graphs call it."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwen2.quantization import int4_kernel
from qwen2.quantization.int4 import (
    Int4WeightOnlyLinear,
    _vnni_layout_codes,
    dequantize_int4,
    from_vnni_layout,
    pack_nibbles,
    quantize_int4,
    to_vnni_layout,
    unpack_nibbles,
)

from conftest import int4_kernel_expected

BF16 = torch.bfloat16


@pytest.fixture
def kernel() -> None:
    if not int4_kernel_expected():
        pytest.skip("no AVX512-VNNI or no C++ compiler: int4 keeps torch's packed kernel")


def _weight(n: int, k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k) * torch.exp(torch.randn(n, 1))  # rows of very different scale
    return quantize_int4(w, group_size, scale_dtype=BF16)


def _activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 per block of 32 in float32: d = max(max |x|, FLT_MIN) / 127, codes = round half to even(x / d)."""
    blocks = x.float().view(x.shape[0], -1, int4_kernel.BLOCK)
    d = blocks.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(blocks / d[..., None]).view(x.shape).to(torch.int8), d


@pytest.mark.parametrize("n, k, group_size, rows", [(128, 896, 32, 1), (48, 96, 32, 3), (80, 512, 64, 5),
                                                    (64, 1024, 128, 2), (16, 256, 256, 9)])
def test_kernel_is_the_exact_product_of_its_quantised_rows(kernel, n, k, group_size, rows):
    """K = 96: not a multiple of 64; 48 and 80 rows: blocks of 16 left after the kernel's tiles of 64; 9 rows:
    two passes of 4 rows and one of 1. Integer reference: sum over k of ((c - 8) * s + z) * q * d in float64."""
    codes, sz = _weight(n, k, group_size)
    scales = torch.exp(torch.randn(rows, k // 32, 1)).expand(rows, k // 32, 32).reshape(rows, k)  # blocks of all sizes
    x = (torch.randn(rows, k) * scales).to(BF16)
    x[0, :32] = 0  # an all-zero block: scale FLT_MIN / 127, codes 0
    bias = torch.randn(n).to(BF16)
    q, d = int4_kernel.quantize_activations(x)
    want_q, want_d = _activations(x)
    assert torch.equal(q, want_q) and torch.equal(d, want_d)
    assert q.abs().max() <= 127

    weight = dequantize_int4(codes, sz, group_size, torch.float64)
    xd = (q.double().view(rows, -1, 32) * d.double()[..., None]).view(rows, k)
    exact = xd @ weight.t() + bias.double()
    out = int4_kernel.linear(x, to_vnni_layout(pack_nibbles(codes)), sz, group_size, bias)
    assert out.dtype == BF16 and out.shape == (rows, n)
    # bf16 rounding of the output (half a unit: at most 2^-8 relative), float32 rounding of the sums of the terms
    terms = xd.abs() @ weight.abs().t() + bias.double().abs()
    error = (out.double() - exact).abs()
    assert (error <= 2.0 ** -8 * exact.abs() + 1e-5 * terms).all(), (error / (exact.abs() + terms)).max()

    # and the unquantised rows: each activation moved by at most half its block's step, d / 2
    unquantised = x.double() @ weight.t() + bias.double()
    step = (d.double() / 2).repeat_interleave(32, 1)
    assert ((out.double() - unquantised).abs() <= 2.0 ** -8 * exact.abs() + 1e-5 * terms + step @ weight.abs().t()).all()


def test_rows_do_not_depend_on_how_many_are_multiplied(kernel):
    """Speculative verification multiplies a few rows where plain decoding multiplies one: the same bits."""
    codes, sz = _weight(176, 256, 32)
    packed = to_vnni_layout(pack_nibbles(codes))
    x = torch.randn(7, 256).to(BF16)
    together = int4_kernel.linear(x, packed, sz, 32)
    alone = torch.cat([int4_kernel.linear(x[i:i + 1], packed, sz, 32) for i in range(7)])
    assert torch.equal(together, alone)


def test_kernel_refuses_what_it_cannot_read(kernel):
    codes, sz = _weight(32, 128, 32)
    packed = to_vnni_layout(pack_nibbles(codes))
    x = torch.randn(1, 128).to(BF16)
    with pytest.raises(RuntimeError, match="bfloat16 x"):
        int4_kernel.linear(x.float(), packed, sz, 32)
    with pytest.raises(RuntimeError, match="multiple of the group size"):
        int4_kernel.linear(x, packed, sz, 48)
    with pytest.raises(RuntimeError, match="N a multiple of 16"):
        int4_kernel.linear(x, packed[:24], sz[:, :24], 32)
    with pytest.raises(RuntimeError, match="scales_and_zeros"):
        int4_kernel.linear(x, packed, sz.float(), 32)


@pytest.mark.parametrize("n, k", [(16, 96), (4864, 64), (48, 896)])
def test_layout_round_trips(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    plain = pack_nibbles(codes)
    packed = to_vnni_layout(plain)
    assert packed.shape == plain.shape and not torch.equal(packed, plain)
    assert torch.equal(from_vnni_layout(packed), plain)
    assert torch.equal(_vnni_layout_codes(packed, torch.int32), codes.to(torch.int32))
    # row i of block r, columns 8c + j (low nibble) and 8c + 4 + j (high): byte 64 c + 4 i + j of the block
    r, i, c, j = 2 % (n // 16), 5, 1, 3
    byte = packed.view(n // 16, -1)[r, 64 * c + 4 * i + j]
    assert byte & 15 == codes[16 * r + i, 8 * c + j] and byte >> 4 == codes[16 * r + i, 8 * c + 4 + j]


def _module(n: int = 64, k: int = 256, group_size: int = 64) -> Int4WeightOnlyLinear:
    lin = nn.Linear(k, n).to(BF16).requires_grad_(False)
    return Int4WeightOnlyLinear.from_linear(lin, group_size)


def test_module_saves_plain_and_a_load_repacks(kernel):
    q = _module()
    assert q._layout == "vnni"
    codes = unpack_nibbles(q.plain_weight())
    state = q.state_dict()
    assert torch.equal(state["weight"], pack_nibbles(codes))  # the portable layout, not the kernel's
    x = torch.randn(3, 256).to(BF16)
    before = q(x)

    other = _module()
    other.load_state_dict(state)  # the codes were packed afresh for the kernel
    assert other._layout == "vnni" and torch.equal(other.weight, q.weight)
    assert torch.equal(other(x), before)
    new_codes = (codes + 5) % 16
    other.load_state_dict({**state, "weight": pack_nibbles(new_codes)})
    assert torch.equal(unpack_nibbles(other.plain_weight()), new_codes)
    assert torch.equal(other.dequantize(), dequantize_int4(new_codes, other.scales_and_zeros, 64))
    assert not torch.equal(other(x), before)


def test_module_prompt_rows_dequantise_the_kernel_layout_exactly(kernel):
    q = _module()
    dense = dequantize_int4(unpack_nibbles(q.plain_weight()), q.scales_and_zeros, 64, BF16)
    assert torch.equal(q.dequantize(BF16), dense)
    x = torch.randn(257, 256).to(BF16)  # from 257 rows
    assert torch.equal(q(x), F.linear(x, dense) + q.bias)


def test_module_repacks_when_its_dtype_no_longer_fits(kernel):
    q = _module()
    plain = q.plain_weight()
    q.to(torch.float32)  # the kernel reads bf16 only: torch's layout and kernel at the next call
    x = torch.randn(2, 256)
    out = q(x)
    assert q._layout == "cpu" and torch.equal(q.plain_weight(), plain)
    torch.testing.assert_close(out, F.linear(x, q.dequantize()) + q.bias, rtol=1e-5, atol=1e-5)
    q.to(BF16)
    q(x.to(BF16))
    assert q._layout == "vnni" and torch.equal(q.plain_weight(), plain)


def test_without_the_kernel_bf16_keeps_torchs(monkeypatch):
    monkeypatch.setattr(int4_kernel, "takes", lambda *args: False)
    q = _module()
    assert q._layout == "cpu"
    x = torch.randn(2, 256).to(BF16)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(BF16)) + q.bias, rtol=2 ** -7, atol=0.02)


def test_a_failed_build_warns_with_the_compilers_error(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'qwen2_int4'\nint4.cpp:1:1: error: no AVX-512 here")

    monkeypatch.setattr(int4_kernel, "_cpu_has_vnni", lambda: True)
    monkeypatch.setattr(int4_kernel, "_build_error", None)
    monkeypatch.setattr(cpp_extension, "load_inline", fail)
    with caplog.at_level(logging.WARNING):
        assert int4_kernel.load.__wrapped__() is False
    assert "error: no AVX-512 here" in int4_kernel.build_error()
    assert "int4 (torch's packed kernel) keeps" in caplog.text and "no AVX-512 here" in caplog.text


def test_compiled_graph_calls_the_kernel(kernel):
    """The operator and its fake implementation let a full graph trace through it; same bits as eager."""
    q = _module()
    x = torch.randn(1, 256).to(BF16)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), q(x))
    assert torch.equal(q(x), int4_kernel.linear(x, q.weight, q.scales_and_zeros, 64, q.bias))


def test_a_saved_compiled_step_is_keyed_by_the_int4_layout(monkeypatch):
    """A decode step compiled for torch's int4 layout must not be loaded for the kernel's (or the reverse): the
    graph calls one kernel, and each reads its own layout."""
    from qwen2 import Qwen2Config, Qwen2ForCausalLM
    from qwen2.cli.warmup import artifacts_key
    from qwen2.quantization import quantize_model

    keys = []
    for takes in (lambda *args: True, lambda *args: False):
        monkeypatch.setattr(int4_kernel, "takes", takes)
        config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
        model = quantize_model(Qwen2ForCausalLM(config).to(BF16).eval(), "int4")
        keys.append(artifacts_key(model))
    assert keys[0]["layouts"] == ["vnni"] and keys[1]["layouts"] == ["cpu"]
