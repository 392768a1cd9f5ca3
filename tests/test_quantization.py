"""int8/int4/W8A8: the packed CPU kernels compute exactly the matmul with the dequantised weight (W8A8: with
the quantised input rows) on random and real GGUF weights, quantisation error stays within half a step, the
model-level swap and the save -> load round trip keep every output bit, and a reload never re-quantises."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwen2.quantization import (
    QUANT_METHOD,
    Int4WeightOnlyLinear,
    Int8DynamicActivationLinear,
    Int8WeightOnlyLinear,
    convert_for_runtime,
    get_handler,
    is_quantized,
    quantize_model,
)
from qwen2.quantization import int4 as int4_mod
from qwen2.quantization import int8 as int8_mod
from qwen2.quantization.int4 import (
    dequantize_int4,
    from_cpu_layout,
    pack_nibbles,
    quantize_int4,
    to_cpu_layout,
    unpack_nibbles,
)
from qwen2.quantization import int4_kernel, kernels
from qwen2.quantization.int8 import dequantize_int8, quantize_int8, quantize_rows

from conftest import int4_kernel_expected, require_int8_kernels

# int4 straight from the default GGUF against transformers' float32, teacher-forced on the seed answer: the least
# share of its next-token choices kept (measured 41 of 48, 0.854; with the Q4_K scales 5% off, 38) and the
# largest relative logit error (measured 0.0920; 5% off: 0.1004)
INT4_AGREEMENT = 0.8
INT4_LOGIT_ERROR = 0.095

MODULES = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear, "w8a8": Int8DynamicActivationLinear}


def _linear(out_features: int, in_features: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.exp(torch.randn(out_features, 1)))  # rows of very different scale
    return lin.to(dtype).requires_grad_(False)


def _reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ dequantised(W).T (+ bias), in float64: what the fused kernel must compute. For int4's VNNI kernel x is
    the rows as it quantises them (int8 codes times a float32 scale per block of 32 columns)."""
    x = x.reshape(-1, x.shape[-1])
    if getattr(module, "_layout", None) == "vnni" and x.shape[0] < int4_mod._VNNI_DEQUANTIZE_FROM_ROWS:
        codes, scales = int4_kernel.quantize_activations(x)
        x = (codes.double().view(x.shape[0], -1, int4_kernel.BLOCK) * scales.double()[..., None]).view(x.shape)
    out = x.double() @ module.dequantize(torch.float64).t()
    return out if module.bias is None else out + module.bias.double()


def _w8a8_reference(module: Int8DynamicActivationLinear, x: torch.Tensor) -> torch.Tensor:
    """The integer product of the input codes and the weight codes, scaled, in float64."""
    codes, row_scales = quantize_rows(x)
    out = (codes.double() @ module.weight.double().t()) * row_scales.double() * module.scales.double()
    return out if module.bias is None else out + module.bias.double()


def _assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, x: torch.Tensor,
                    module: nn.Module) -> None:
    """Each output within the dtype's rounding of its own scale: |ref|, and the root-sum-square of its products
    x[m, k] * w[n, k], the size the rounding errors of the inputs and of a weight dequantised to dtype add up to
    (twice it: their sum reaches ~4 standard deviations over thousands of outputs). Per input row and weight row:
    the weight rows here differ in scale by up to ~400x, and a tolerance scaled by the largest output of the
    tensor let a small row be ~10% off."""
    # float32: summation order only. bf16/fp16: the output's own rounding (inputs are already in that dtype).
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9}[dtype]
    x = x.reshape(-1, x.shape[-1]).double()
    products = (x.square() @ module.dequantize(torch.float64).square().t()).sqrt()
    error = (out.reshape(ref.shape).double() - ref).abs()
    bound = rtol * (ref.abs() + 2 * products)
    assert (error <= bound).all(), f"worst error {(error / bound).max().item():.2f}x the bound"


# ------------------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 8, 16])  # 3, 24 and 48 rows: fused kernel, then dequantise + GEMM
@pytest.mark.parametrize("shape", [(256, 896), (96, 48), (64, 40)])  # (64, 40): in % 16 != 0 -> portable path
def test_int8_kernel_equals_dequantized_matmul(shape, batch, dtype):
    lin = _linear(*shape, dtype=dtype)
    q = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(batch, 3, shape[1]).to(dtype)
    out = q(x)
    assert out.shape == (batch, 3, shape[0]) and out.dtype == dtype
    _assert_matches(out, _reference(q, x.reshape(-1, shape[1])), dtype, x, q)


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(300, 128) * torch.exp(torch.randn(300, 1))
    q, scales = quantize_int8(w, scale_dtype=torch.float32)
    err = (dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-6)).all()
    assert q.abs().amax(dim=1).min() == 127  # each row uses the full range


def _choose_int8_kernels(which: str, monkeypatch) -> None:
    """Run with the AVX-512 kernels (skipped where they cannot be built) or with torch's operations."""
    if which == "torch":
        monkeypatch.setattr(kernels, "load", lambda: False)
    else:
        require_int8_kernels()


def test_int8_kernels_build_where_the_cpu_and_a_compiler_allow():
    require_int8_kernels()  # fails, naming the compiler's error, where the kernels should have built
    assert kernels.usable(torch.zeros(8, kernels.K_MULTIPLE, dtype=torch.int8))


def test_failed_kernel_build_warns_naming_the_compilers_error(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def failed_build(*args, **kwargs):  # what torch raises when the compiler fails (abridged)
        raise RuntimeError("Error building extension 'qwen2_int8': [1/2] c++ -MMD -c main.cpp -o main.o\n"
                           "FAILED: [code=1] main.o\nmain.cpp:46:28: error: expected ',' before 'oops'\n")

    monkeypatch.setattr(cpp_extension, "load_inline", failed_build)
    monkeypatch.setattr(kernels, "_cpu_has_vnni", lambda: True)
    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_build_error", None)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.load.__wrapped__() is False  # uncached: the real load() keeps its answer
    assert "main.cpp:46:28: error: expected ',' before 'oops'" in kernels.build_error()
    assert kernels.build_error() in caplog.text and not kernels._loaded


@pytest.mark.parametrize("which", ["avx512", "torch"])
def test_row_quantisation_error_is_at_most_half_a_step(which, monkeypatch):
    _choose_int8_kernels(which, monkeypatch)
    x = torch.randn(7, 96) * torch.exp(torch.randn(7, 1))
    x[3] = 0
    original = x.clone()
    codes, scales = quantize_rows(x)
    assert torch.equal(x, original)  # a float32 input is not rounded in place
    assert codes.dtype == torch.int8 and scales.shape == (7, 1)
    assert ((codes.float() * scales - x).abs() <= scales / 2 * (1 + 1e-6)).all()
    assert (codes[3] == 0).all()
    assert codes.abs().amax(dim=1).tolist() == [127, 127, 127, 0, 127, 127, 127]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("shape", [(256, 896), (64, 40)])
def test_w8a8_is_the_integer_product(shape, rows, dtype):
    lin = _linear(*shape, dtype=dtype)
    q = Int8DynamicActivationLinear.from_linear(lin)
    x = torch.randn(rows, shape[1]).to(dtype)
    out = q(x)
    assert out.shape == (rows, shape[0]) and out.dtype == dtype
    _assert_matches(out, _w8a8_reference(q, x), dtype, x, q)
    # int8's weight tensors (same checkpoints), and still the same layer: activation rounding costs ~1% here
    weight_only = Int8WeightOnlyLinear.from_linear(lin).state_dict()
    assert all(torch.equal(value, weight_only[key]) for key, value in q.state_dict().items())
    exact = _reference(q, x)
    assert (out.double() - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, k", [(1, 17), (3, 896), (40, 4864)])  # 17: only the scalar tail
def test_row_quantisation_kernel_gives_the_bits_of_torch_operations(rows, k, dtype, monkeypatch):
    x = (torch.randn(rows, k) * torch.exp(3 * torch.randn(rows, 1))).to(dtype)
    x[0, : k // 2] = 0
    x[-1] = ((torch.arange(k) % 254) - 127) / 2  # with the 127 below, scale 1: every other code is a tie
    x[-1, 0] = 127
    _choose_int8_kernels("avx512", monkeypatch)
    codes, scales = quantize_rows(x)
    _choose_int8_kernels("torch", monkeypatch)
    expected_codes, expected_scales = quantize_rows(x)
    assert torch.equal(scales, expected_scales) and torch.equal(codes, expected_codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, shape", [(2, (40, 904)), (64, (4864, 896)), (64, (896, 4864))])
def test_w8a8_kernels_give_the_bits_of_torch_operations(rows, shape, dtype, monkeypatch):
    # 904 inputs and 40 outputs leave 8-element tails after the 16-wide loops
    q = Int8DynamicActivationLinear.from_linear(_linear(*shape, dtype=dtype))
    x = torch.randn(rows, shape[1], dtype=dtype)
    _choose_int8_kernels("avx512", monkeypatch)
    out = q(x)
    _choose_int8_kernels("torch", monkeypatch)
    assert torch.equal(out, q(x))


@pytest.mark.parametrize("rows", [1, 3, 8, 13])  # 13: a block of 8 rows, then one of 5
@pytest.mark.parametrize("n, k", [(1, 32), (17, 896), (300, 4864)])  # 4864: int32 partials flushed 19 times
def test_vnni_rowdot_is_the_integer_dot_product(n, k, rows):
    require_int8_kernels()
    x = torch.randint(-32767, 32768, (rows, k), dtype=torch.int16)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    x[:, : k // 2], w[0] = -32767, -128  # weight row 0: the largest int32 partial sums the kernel can meet
    exact = x.double() @ w.double().t()
    torch.testing.assert_close(kernels.rowdot(x, w).double(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())


def test_int8_survives_unaligned_input_and_weight():
    # torch._weight_int8pack_mm's vector loads crash the process on unaligned memory; the module must copy.
    lin = _linear(64, 896, dtype=torch.bfloat16)
    q = Int8WeightOnlyLinear.from_linear(lin)
    storage = torch.randn(4 * 896 + 8).to(torch.bfloat16)
    x = storage[1:1 + 896].view(1, 896)
    assert x.data_ptr() % 32 != 0
    _assert_matches(q(x), _reference(q, x), torch.bfloat16, x, q)

    state = q.state_dict()
    raw = torch.empty(state["weight"].numel() + 1, dtype=torch.int8)
    raw[1:] = state["weight"].reshape(-1)
    state["weight"] = raw[1:].view(64, 896)  # as an mmap'd checkpoint may be
    fresh = Int8WeightOnlyLinear(896, 64, dtype=torch.bfloat16)
    fresh.load_state_dict(state, assign=True)
    assert fresh.weight.data_ptr() % 32 == 0
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- int4


def _int4_cpu_layout(dtype: torch.dtype) -> str:
    """The layout a CPU module packs to: the VNNI kernel's for bf16 where it can be built, else torch's."""
    return "vnni" if dtype == torch.bfloat16 and int4_kernel_expected() else "cpu"


@pytest.mark.parametrize("unpack", ["blocks", "gather"])
@pytest.mark.parametrize("n, k", [(128, 896), (80, 64), (176, 256), (4864, 128)])
def test_cpu_layout_is_the_ops_and_inverts(n, k, unpack, monkeypatch):
    if unpack == "gather":  # the fallback for layouts without blocks of halves
        monkeypatch.setattr(int4_mod, "_cpu_block_rows", lambda: None)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    plain = pack_nibbles(codes)
    assert torch.equal(unpack_nibbles(plain), codes)
    cpu = to_cpu_layout(plain)
    assert torch.equal(cpu, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
    assert torch.equal(from_cpu_layout(cpu), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_equals_dequantized_matmul(group_size, batch, dtype):
    lin = _linear(4864 // 19, 1024, dtype=dtype)  # 256 x 1024
    q = Int4WeightOnlyLinear.from_linear(lin, group_size)
    assert q._layout == _int4_cpu_layout(dtype)
    x = torch.randn(batch, 1024).to(dtype)
    _assert_matches(q(x), _reference(q, x), dtype, x, q)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_prompt_rows_dequantise_the_packed_weight_exactly(group_size, dtype, monkeypatch):
    """From 128 rows the layer dequantises straight from torch's CPU layout and runs the dense GEMM: bit for bit
    the weight the plain layout stands for, and the same product as the kernel."""
    if platform.machine() in ("x86_64", "AMD64"):
        assert int4_mod._cpu_block_rows() in (32, 64)  # AVX2 or AVX-512: the halves layout is recognised
    monkeypatch.setattr(int4_kernel, "takes", lambda *args: False)  # torch's layout for bf16 too
    q = Int4WeightOnlyLinear.from_linear(_linear(4864 // 19, 1024, dtype=dtype), group_size)
    assert q._layout == "cpu"
    dense = dequantize_int4(unpack_nibbles(q.plain_weight()), q.scales_and_zeros, group_size, dtype)
    assert torch.equal(q.dequantize(dtype), dense)
    x = torch.randn(int4_mod._DEQUANTIZE_FROM_ROWS, 1024).to(dtype)
    assert torch.equal(q(x), F.linear(x, dense) + q.bias)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.weight, group_size, q.scales_and_zeros) + q.bias
    for got in (q(x), kernel):  # each within rounding of the exact product (of one another: twice that)
        _assert_matches(got, _reference(q, x), dtype, x, q)


def test_int4_portable_path_equals_kernel():
    # Off the CPU the module dequantises and calls F.linear; on CPU that path is reachable with the plain layout.
    q = Int4WeightOnlyLinear.from_linear(_linear(128, 256), 32)
    x = torch.randn(5, 256)
    fast = q(x)
    q.weight, q._layout = q.plain_weight(), "plain"
    torch.testing.assert_close(q(x), fast, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_min_max_grid_error_is_about_half_a_step(group_size):
    w = torch.randn(64, 512) * torch.exp(torch.randn(64, 1))
    codes, sz = quantize_int4(w, group_size, scale_dtype=torch.bfloat16, clip_ratios=(1.0,))
    err = (dequantize_int4(codes, sz, group_size) - w).abs().view(64, -1, group_size)
    scale = sz[..., 0].float().t()[..., None]
    zero = sz[..., 1].float().t()[..., None]
    # half a step, plus what rounding scale and zero to bf16 can push an extreme value past the grid
    assert (err <= 0.55 * scale + zero.abs() * 2 ** -8).all()
    assert codes.min() == 0 and codes.max() == 15


def test_int4_clip_search_never_increases_a_groups_error():
    w = torch.randn(128, 256)
    w[::7, ::13] *= 6  # outliers, where clipping pays
    plain = quantize_int4(w, 32, clip_ratios=(1.0,))
    searched = quantize_int4(w, 32)

    def group_error(codes, sz):
        return (dequantize_int4(codes, sz, 32) - w).square().view(128, -1, 32).sum(-1)

    assert (group_error(*searched) <= group_error(*plain)).all()
    assert group_error(*searched).sum() < 0.99 * group_error(*plain).sum()


def test_int4_rejects_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(32, 96), 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4WeightOnlyLinear(64, 8)
    with pytest.raises(ValueError, match="group_size"):
        get_handler("int4", group_size=48)
    with pytest.raises(ValueError, match="Unknown quantisation scheme"):
        get_handler("int3")


def test_foreign_or_repeated_quantisation_is_refused():
    model = _tiny_model()
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        convert_for_runtime(model, {"quant_method": "gptq", "bits": 4})
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(model, "int4")


# ------------------------------------------------------------------------------------------ real weights


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "blk.0.ffn_down.weight", "output.weight"])
def test_kernels_on_real_gguf_weights(default_gguf, name):
    from qwen2.loading.gguf import GGUFFile

    w = GGUFFile(default_gguf).dequantize(name, torch.bfloat16)[:8192]  # lm_head: its first 8192 rows
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.copy_(w)
    x = torch.randn(4, w.shape[1]).to(torch.bfloat16)
    exact = x.double() @ w.double().t()
    for q, max_error in [(Int8WeightOnlyLinear.from_linear(lin), 0.03), (Int4WeightOnlyLinear.from_linear(lin, 32), 0.15),
                         (Int8DynamicActivationLinear.from_linear(lin), 0.04)]:
        out = q(x)
        reference = _w8a8_reference if isinstance(q, Int8DynamicActivationLinear) else _reference
        _assert_matches(out, reference(q, x), torch.bfloat16, x, q)
        # and the quantised layer is still the same layer: relative error of its output
        assert (out.double() - exact).norm() / exact.norm() < max_error


@pytest.mark.slow
def test_w8a8_real_model_follows_the_float32_reference(default_gguf, hf_gguf_model):
    """W8A8 on the default GGUF, fed the seed prompt and transformers' float32 greedy answer: its next-token
    choices agree with transformers' float32 ones at 94% (45 of 48; bf16 and int8: 98%, int4: 85%)."""
    from conftest import REFERENCE_DIR
    from qwen2 import AutoTokenizer, Qwen2ForCausalLM

    reference = json.loads((REFERENCE_DIR / "seed_prompt_greedy.json").read_text())
    ids = AutoTokenizer.from_pretrained(str(default_gguf))(reference["rendered_prompt"])["input_ids"]
    answer = reference["new_token_ids"]
    sequence = torch.tensor([ids + answer])
    model = Qwen2ForCausalLM.from_pretrained(str(default_gguf), dtype=torch.bfloat16, quantization="w8a8").eval()
    assert sum(type(m) is Int8DynamicActivationLinear for m in model.modules()) == 24 * 7
    assert type(model.lm_head) is Int8WeightOnlyLinear  # the head keeps float activations
    with torch.no_grad():
        ours = model(sequence).logits[0, len(ids) - 1:-1].float()
        theirs = hf_gguf_model(sequence).logits[0, len(ids) - 1:-1]
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agreement >= 0.9, agreement
    assert ours.argmax(-1)[0] == answer[0]


# ------------------------------------------------------------------------------------------ whole model


def _tiny_model(tie: bool = False):
    from qwen2 import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return Qwen2ForCausalLM(config).eval()


def _dequantized_twin(model: nn.Module) -> nn.Module:
    """The float model with each quantised layer replaced by an nn.Linear holding its dequantised weight."""
    import copy

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.weight = nn.Parameter(module.dequantize(torch.float32), requires_grad=False)
            if module.bias is not None:
                lin.bias = nn.Parameter(module.bias.float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, lin)
    return twin


@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32), ("w8a8", None)])
def test_quantize_model_swaps_every_linear(scheme, group_size):
    model = _tiny_model()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        float_logits = model(ids).logits
        quantize_model(model, scheme, group_size=group_size)
        logits = model(ids).logits
        twin_logits = _dequantized_twin(model)(ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)) for m in model.modules()) == 2 * 7 + 1
    assert all(type(m) is MODULES[scheme] for name, m in model.named_modules() if name.endswith("_proj"))
    config = model.config.quantization_config
    assert config["quant_method"] == QUANT_METHOD and config["scheme"] == scheme
    assert config.get("group_size") == group_size
    if scheme == "w8a8":  # the activations are rounded too: near the weight-only model, not equal to it
        torch.testing.assert_close(logits, twin_logits, rtol=0.02, atol=0.02 * twin_logits.abs().max().item())
    else:
        torch.testing.assert_close(logits, twin_logits, rtol=1e-5, atol=1e-5)
    # and quantisation changed the model only a little
    assert (logits - float_logits).abs().max() < (0.3 if scheme == "int4" else 0.05) * float_logits.abs().max()


def test_quantising_after_generate():
    model = _tiny_model()
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, disable_compile=True)
    quantize_model(model, "int8")
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in model.modules()) == 2 * 7 + 1


def test_int4_keeps_and_records_layers_it_cannot_take():
    model = _tiny_model()
    quantize_model(model, "int4", group_size=128)  # hidden 64 is not a multiple of 128: only down_proj converts
    skipped = model.config.quantization_config["modules_to_not_convert"]
    assert "lm_head" in skipped and "model.layers.0.self_attn.q_proj" in skipped
    assert isinstance(model.model.layers[1].mlp.down_proj, Int4WeightOnlyLinear)
    assert type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32), ("int4", 64), ("w8a8", None)])
def test_save_and_reload_without_requantising(tmp_path, monkeypatch, scheme, group_size):
    from safetensors.torch import load_file

    from qwen2 import Qwen2ForCausalLM

    model = _tiny_model()
    quantize_model(model, scheme, group_size=group_size, modules_to_not_convert=["model.layers.1.mlp.up_proj"])
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == model.config.quantization_config

    def refuse(*args, **kwargs):
        raise AssertionError("a quantised checkpoint was quantised again on load")

    monkeypatch.setattr(int8_mod, "quantize_int8", refuse)
    monkeypatch.setattr(int4_mod, "quantize_int4", refuse)
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded.model.layers[1].mlp.up_proj) is nn.Linear
    assert type(reloaded.model.layers[0].mlp.up_proj) is MODULES[scheme]
    assert type(reloaded.lm_head) is (Int8WeightOnlyLinear if scheme == "w8a8" else MODULES[scheme])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    tensors = load_file(tmp_path / "model.safetensors")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, tensors[key]), key


def test_convert_for_runtime_rebuilds_the_saved_modules():
    model = _tiny_model()
    quantize_model(model, "int4", group_size=64)
    state = model.state_dict()
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    convert_for_runtime(skeleton, model.config.quantization_config)
    assert {k: (v.shape, v.dtype) for k, v in skeleton.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in state.items()}


def test_tied_lm_head_stays_float():
    # Quantising a tied head would leave tie_weights() to overwrite it with the float embedding on reload.
    model = _tiny_model(tie=True)
    quantize_model(model, "int8")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" in model.config.quantization_config["modules_to_not_convert"]


# ------------------------------------------------------------------------------- GGUF 4-bit blocks, directly


@pytest.mark.slow
def test_real_q4_k_layer_goes_to_int4_with_its_codes(default_gguf):
    """blk.2.ffn_down (Q4_K) taken straight into int4 group 32 for a bfloat16 model. Dequantised, it is gguf-py's
    dequantisation up to storing each sub-block's scale and zero in bfloat16 (relative rounding <= 2^-8 each:
    |error| <= 2^-8 (|q - 8| |scale| + |zero|), plus float32 rounding). Here the zeros stay within about 8 steps of 0
    (each sub-block's range straddles 0), so that is under 1/16 of a quantisation step (measured: 4.8% at
    most, 0.5% on average), where the clip-search requantisation it replaces moves weights
    by up to half a step. The packed kernel then computes the matmul with exactly that dequantised weight."""
    import gguf
    from gguf import GGMLQuantizationType

    from qwen2.loading.gguf import iter_gguf_sources
    from qwen2.quantization.gguf import int4_from_gguf

    sources = iter_gguf_sources(default_gguf)  # each source reads through the generator's open file
    source = next(s for name, s in sources if name == "model.layers.2.mlp.down_proj.weight")
    assert source.ggml_type == GGMLQuantizationType.Q4_K
    n, k = source.shape
    tensors = int4_from_gguf(source, 32, torch.bfloat16)
    raw = source.blocks(0, n * k).numpy().reshape(n, -1)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, GGMLQuantizationType.Q4_K)).double().view(n, k // 32, 32)

    codes = unpack_nibbles(tensors["weight"]).view(n, k // 32, 32).double()
    scale, zero = (tensors["scales_and_zeros"][..., i].t().double()[..., None] for i in (0, 1))
    error = ((codes - 8) * scale + zero - expected).abs()
    bound = 2.0 ** -8 * ((codes - 8).abs() * scale.abs() + zero.abs()) + 2.0 ** -21 * (16 * scale.abs() + zero.abs())
    assert (error <= bound).all()
    stepped = (scale != 0).expand_as(error)  # a sub-block scale of 0 (7 of them here) is one constant value
    assert (error[stepped] <= scale.abs().expand_as(error)[stepped] / 16).all()

    module = Int4WeightOnlyLinear(k, n, bias=False, group_size=32, dtype=torch.bfloat16)
    module.load_state_dict(tensors)
    assert module._layout == _int4_cpu_layout(torch.bfloat16)
    torch.testing.assert_close(module.dequantize(torch.float64).view(n, k // 32, 32), (codes - 8) * scale + zero,
                               rtol=0, atol=0)
    for batch in (1, 5):
        x = torch.randn(batch, k).to(torch.bfloat16)
        _assert_matches(module(x), _reference(module, x), torch.bfloat16, x, module)


@pytest.mark.slow
def test_real_int4_load_from_the_gguf_keeps_greedy_output(default_gguf, hf_gguf_model, hf_gguf_tokenizer):
    """from_pretrained(gguf, quantization="int4") (Q4_K layers taken as they are) against transformers'
    float32 model, teacher-forced on the seed prompt and its float32 greedy answer: its next-token choices agree
    with float32's at least INT4_AGREEMENT of the time and its logits are within INT4_LOGIT_ERROR of float32's.
    And against the earlier path, quantising the bfloat16 load: the same 32 greedy tokens, or else logits at
    least as close to float32's (over every position: the agreement turns on a few near-ties, which the int4
    kernel's int8 rows flip either way; measured 41 vs 43 of 48, logit error 0.0918 vs 0.0931)."""
    from qwen2 import Qwen2ForCausalLM

    reference = json.loads((Path(__file__).parent / "reference" / "seed_prompt_greedy.json").read_text())
    prompt = hf_gguf_tokenizer.apply_chat_template(reference["prompt_messages"], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]
    continuation = torch.tensor(reference["new_token_ids"])
    direct = Qwen2ForCausalLM.from_pretrained(default_gguf, dtype=torch.bfloat16, quantization="int4", group_size=32)
    requantised = quantize_model(Qwen2ForCausalLM.from_pretrained(default_gguf, dtype=torch.bfloat16), "int4", 32)
    sequence = torch.cat([prompt[0], continuation])[None]
    with torch.no_grad():
        float32 = hf_gguf_model(sequence).logits[0, prompt.shape[1] - 1:-1]
    assert torch.equal(float32.argmax(-1), continuation)  # the reference answer is float32's greedy one
    outputs, agreement, error = [], [], []
    for model in (direct, requantised):
        with torch.no_grad():
            outputs.append(model.generate(prompt, max_new_tokens=32, do_sample=False)[0, prompt.shape[1]:])
            logits = model(sequence).logits[0, prompt.shape[1] - 1:-1].float()
        agreement.append((logits.argmax(-1) == continuation).float().mean().item())
        error.append(((logits - float32).norm() / float32.norm()).item())
    print(f"vs transformers fp32: agreement direct {agreement[0]:.3f}, requantised {agreement[1]:.3f}; "
          f"relative logit error direct {error[0]:.4f}, requantised {error[1]:.4f}")
    assert agreement[0] >= INT4_AGREEMENT and error[0] < INT4_LOGIT_ERROR
    assert torch.equal(outputs[0], outputs[1]) or error[0] <= error[1]


@pytest.fixture(scope="module")
def seed_greedy_64(default_gguf, hf_gguf_tokenizer):
    """Greedy 64-token answers to the seed prompt: {(scheme, compiled): token ids}, computed on demand."""
    from qwen2 import Qwen2ForCausalLM

    reference = json.loads((Path(__file__).parent / "reference" / "seed_prompt_greedy.json").read_text())
    prompt = hf_gguf_tokenizer.apply_chat_template(reference["prompt_messages"], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]
    models, answers = {}, {}

    def answer(scheme: str | None, compiled: bool) -> list[int]:
        if (scheme, compiled) not in answers:
            if scheme not in models:
                models[scheme] = Qwen2ForCausalLM.from_pretrained(default_gguf, dtype=torch.bfloat16,
                                                                  quantization=scheme)
            with torch.no_grad():
                out = models[scheme].generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                              disable_compile=not compiled, return_dict_in_generate=True,
                                              output_logits=True)
            answers[scheme, compiled] = out.sequences[0, prompt.shape[1]:].tolist(), torch.stack(out.logits)[:, 0]
        return answers[scheme, compiled]

    return answer


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])  # the int8 layers' eager and compiled single-row paths
def test_real_int8_greedy_equals_bf16_for_64_tokens(seed_greedy_64, compiled):
    """The int8 quality bar of the speed issue: on the seed prompt, int8's greedy output equals bfloat16's for
    (at least) the first 64 tokens. bf16 has two answers here: its eager and compiled paths part at a
    near-tie (token 42, 0.05 logits apart in float32), where any rounding change picks the other token; int8
    must give one of them in full, and the two may only part where bf16's own top two are that close."""
    int8, _ = seed_greedy_64("int8", compiled)
    (eager, eager_logits), (fast, _) = seed_greedy_64(None, False), seed_greedy_64(None, True)
    assert int8 in (eager, fast)
    parted = [i for i, (a, b) in enumerate(zip(eager, fast)) if a != b]
    if parted:
        top2 = eager_logits[parted[0]].float().topk(2).values
        assert top2[0] - top2[1] < 0.25, "bf16's eager and compiled answers part at a clear choice"
