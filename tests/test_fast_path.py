"""The fast decode path computes what the plain one does: oneDNN's inner product vs `F.linear`, the compiled
decode step vs the eager one, and generate()'s tokens with the fast path on vs off (tiny config and, marked
slow, the real default model). Nothing here is timed; that the model is left as it was is
test_fast_path_keeps_model.py's subject."""

from __future__ import annotations

import json
import logging
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwen2
from qwen2.generation import fast
from qwen2.row_linear import row_linear

from conftest import REFERENCE_DIR, cpu_flags, require_int8_kernels

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
)
# oneDNN's bf16 inner product needs AVX-512 (avx512_core) or AVX-NE-CONVERT: only a CPU without them may skip;
# on one with them, a torch build or check that refuses to pack fails the tests below.
ONEDNN_BF16_CPU = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags() or "avx_ne_convert" in cpu_flags()
needs_onednn = pytest.mark.skipif(not ONEDNN_BF16_CPU, reason="this CPU has no bf16 instructions for oneDNN")


# compiled bf16 logits at most this much further from float32 than eager's (measured 0.97: 6.63e-3 against
# 6.85e-3 relative; with the compiled linears' outputs 0.2% off, 1.17)
BF16_COMPILED_ERROR_RATIO = 1.1


def tiny_model(dtype: torch.dtype) -> qwen2.Qwen2ForCausalLM:
    torch.manual_seed(0)
    return qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**TINY)).eval().to(dtype)


@pytest.fixture
def plain_settings(monkeypatch):
    """Neither oneDNN linears nor compiling unless a test asks for it."""
    monkeypatch.setattr(fast, "settings", fast.FastPathSettings(row_kernels=False, onednn_linears=False, compile=False))
    return fast.settings


def is_compiled(step) -> bool:
    return isinstance(step.func, fast.CompiledDecodeStep)


# ------------------------------------------------------------------------------------------ eager linears


class _Recorder(fast.DecodeLinears):
    """DecodeLinears that also records which linears it sent to oneDNN."""

    def __init__(self) -> None:
        super().__init__()
        self.onednn = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and args[1].dtype == torch.bfloat16 and not torch.is_grad_enabled():
            self.onednn += 1
        return super().__torch_function__(func, types, args, kwargs)


def _onednn_equals_f_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The decode path's bf16 linear: through oneDNN (once), with F.linear's bits (the row kernels, which take
    up to 16 rows first, have tests of their own in test_row_kernels)."""
    with torch.no_grad(), mock.patch.object(fast.settings, "row_kernels", False):
        expected = F.linear(x, linear.weight, linear.bias)
        with _Recorder() as mode:
            got = linear(x)
    assert mode.onednn == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return got


@needs_onednn
def test_onednn_takes_bf16_where_the_cpu_can():
    assert fast._onednn_bf16(), "oneDNN refuses bf16 on a CPU with AVX-512"


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 96), (8, 96), (3, 5, 96), (512, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_eager_decode_linears_equal_f_linear_bit_for_bit(shape, bias):
    """bfloat16: oneDNN's inner product on the weight as it is gives F.linear's bits (same inputs, float32
    accumulation, one rounding); float32 and anything with grad are F.linear itself."""
    linear = nn.Linear(96, 200, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    got = _onednn_equals_f_linear(linear, x)
    with torch.no_grad():
        exact = F.linear(x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double())
        torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=2e-2)  # rounding of the bf16 output
    with fast.DecodeLinears():  # with grad: autograd's F.linear
        y = linear(x)
    y.sum().backward()
    assert linear.weight.grad is not None


# ------------------------------------------------------------------------------------------ compiled decode step


def _decode_logits(model, step, prompt, steps):
    """Logits of `steps` greedy decode steps after prefilling `prompt`, through `step`."""
    config = qwen2.GenerationConfig(max_new_tokens=steps)
    config.max_length = prompt.shape[1] + steps
    cache = model._make_cache(prompt.shape[0], config.max_length)
    with torch.no_grad():
        position = torch.arange(prompt.shape[1])[None].expand(prompt.shape[0], -1)
        logits = model._forward_last_logits(prompt, None, position, cache, torch.arange(prompt.shape[1]))
        out = [logits]
        tokens, pos = logits.argmax(-1, keepdim=True), position[:, -1:] + 1
        for i in range(steps - 1):
            logits = step(tokens, pos, torch.tensor([prompt.shape[1] + i]), None, cache)
            out.append(logits)
            tokens, pos = logits.argmax(-1, keepdim=True), pos + 1
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_step_matches_eager_on_tiny_model(dtype, tol, plain_settings):
    model = tiny_model(dtype)
    prompt = torch.randint(3, 96, (2, 6))
    eager = _decode_logits(model, model._decode_step, prompt, 6)
    step = fast.CompiledDecodeStep()
    compiled = _decode_logits(model, lambda *args: step(model, *args), prompt, 6)
    assert not step.failed
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)


def test_generate_compiles_once_and_matches_eager(plain_settings):
    """One compiled graph serves every prompt and cache length (the cache length is a dynamic dimension)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**{**TINY, "max_position_embeddings": 1024})).eval()
    model.to(torch.bfloat16)
    prompts = [torch.randint(3, 96, (1, length)) for length in (5, 300, 9, 700)]  # caches of 256, 512, 1024
    eager = [model.generate(p, max_new_tokens=10, do_sample=False, disable_compile=True) for p in prompts]
    graphs = None
    for prompt, expected in zip(prompts, eager):
        got = model.generate(prompt, max_new_tokens=10, do_sample=False, disable_compile=False)
        assert torch.equal(got, expected)
        if graphs is not None:
            assert counters["stats"]["unique_graphs"] == graphs, "the decode step was recompiled"
        graphs = counters["stats"]["unique_graphs"]
    assert not fast.compiled_step(model).failed


def test_several_rows_compile_once_and_match_eager(plain_settings):
    """Batches decode compiled too (the row kernel inside the graph where the CPU has it), with the batch a
    dynamic dimension: one more graph serves every several-row batch, and greedy tokens equal eager ones."""
    from torch._dynamo.utils import counters

    plain_settings.row_kernels = True
    model = tiny_model(torch.bfloat16)
    torch.manual_seed(1)
    graphs = None
    for rows, length in ((3, 7), (5, 12)):
        ids = torch.randint(3, 96, (rows, length))
        mask = torch.ones_like(ids)
        mask[0, :length // 2] = 0  # a left-padded row
        kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = model.generate(ids, disable_compile=True, **kwargs)
        assert torch.equal(model.generate(ids, disable_compile=False, **kwargs), expected)
        if graphs is not None:
            assert counters["stats"]["unique_graphs"] == graphs, f"recompiled for a batch of {rows}"
        graphs = counters["stats"]["unique_graphs"]
    assert not fast.compiled_step(model).failed


def _compiled_single_row(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) compiled as the decode step compiles it (under DecodeLinears)."""
    torch._dynamo.reset()  # `run` is one code object for every call: without a reset its 8 recompilations run out

    def run(x):
        with fast.DecodeLinears():
            return module(x)

    with torch.no_grad():
        return torch.compile(run, dynamic=False)(x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 320), (1, 320)])
@pytest.mark.parametrize("in_features", [320, 4864])  # 4864 > 4096: the sum is split in chunks
def test_row_linear_compiled_matches_f_linear(bias, shape, in_features, monkeypatch):
    """The compiled single-row product of a plain nn.Linear is the reduction (row_linear), and is F.linear up
    to the rounding of the bfloat16 output."""
    traced = []
    monkeypatch.setattr(fast, "row_linear", lambda *args: traced.append(args) or row_linear(*args))
    linear = nn.Linear(in_features, 200, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(*shape[:-1], in_features, dtype=torch.bfloat16)
    got = _compiled_single_row(linear, x)
    assert traced and traced[0][1] is linear.weight
    with torch.no_grad():
        exact = F.linear(x.double(), linear.weight.double(), None if not bias else linear.bias.double())
        torch.testing.assert_close(got.double(), exact, rtol=8e-3, atol=1e-3)  # bf16 has 8 mantissa bits
        torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=8e-3, atol=1e-3)


def _assert_int8_compiled_row_matches_dequantized(linear: nn.Linear, x: torch.Tensor) -> None:
    from qwen2.quantization.int8 import Int8WeightOnlyLinear

    int8 = Int8WeightOnlyLinear.from_linear(linear)
    got = _compiled_single_row(int8, x)
    with torch.no_grad():
        exact = F.linear(x.double(), int8.dequantize(torch.float64),
                         None if linear.bias is None else linear.bias.double())
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=2e-3)  # bf16 output (and bias add)


@pytest.mark.parametrize("kernel", ["vnni", "float reduction"])
@pytest.mark.parametrize("in_features", [320, 4864])
def test_int8_compiled_row_matches_dequantized_matmul(in_features, kernel, monkeypatch):
    from qwen2.quantization import kernels

    if kernel == "vnni":
        require_int8_kernels()
    monkeypatch.setattr(kernels, "_loaded", kernel == "vnni")
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 200, bias=True, dtype=torch.bfloat16)
    _assert_int8_compiled_row_matches_dequantized(linear, torch.randn(1, 1, in_features, dtype=torch.bfloat16))


@pytest.mark.parametrize("kernel", ["vnni", "float reduction"])
@pytest.mark.parametrize("in_features", [320, 4864])
def test_w8a8_compiled_row_is_the_integer_product(in_features, kernel, monkeypatch):
    """Compiled single-row W8A8 (the VNNI kernel on the input codes, or inductor's reduction over them) and
    eager (`torch._int_mm`) all compute the scaled integer product, up to the bf16 output's rounding."""
    from qwen2.quantization import kernels
    from qwen2.quantization.int8 import Int8DynamicActivationLinear, quantize_rows

    if kernel == "vnni":
        require_int8_kernels()
    monkeypatch.setattr(kernels, "_loaded", kernel == "vnni")

    torch.manual_seed(0)
    module = Int8DynamicActivationLinear.from_linear(nn.Linear(in_features, 200, dtype=torch.bfloat16))
    x = torch.randn(1, 1, in_features, dtype=torch.bfloat16)
    codes, row_scales = quantize_rows(x.view(1, -1))
    exact = ((codes.double() @ module.weight.double().t()) * row_scales.double() * module.scales.double()
             + module.bias.double()).view(1, 1, -1)
    with torch.no_grad():
        eager = module(x)
    for got in (_compiled_single_row(module, x), eager):
        torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=2e-3)


def test_compiled_step_with_left_padding_matches_eager(plain_settings):
    """Padded rows go through the compiled attention's mask (fp32: the logits agree to rounding)."""
    model = tiny_model(torch.float32)
    prompt = torch.randint(3, 96, (2, 7))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    eager = model.generate(prompt, disable_compile=True, **kwargs)
    compiled = model.generate(prompt, disable_compile=False, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-4, atol=1e-4)


def test_compile_failure_falls_back_to_eager(plain_settings, monkeypatch, caplog):
    model = tiny_model(torch.float32)
    prompt = torch.randint(3, 96, (1, 5))
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, disable_compile=True)

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("C++ compiler not found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="qwen2.generation.fast"):
        got = model.generate(prompt, max_new_tokens=6, do_sample=False, disable_compile=False)
    assert torch.equal(got, expected)
    assert "decoding eagerly" in caplog.text and fast.compiled_step(model).failed


def test_compile_policy(plain_settings):
    model = tiny_model(torch.float32)
    config = qwen2.GenerationConfig(max_new_tokens=8)
    assert not is_compiled(fast.decode_step_fn(model, config))  # settings.compile=False
    plain_settings.compile = None
    assert not is_compiled(fast.decode_step_fn(model, config))  # auto: too few tokens to pay off
    config.max_new_tokens = plain_settings.compile_min_new_tokens
    assert is_compiled(fast.decode_step_fn(model, config))  # auto: enough tokens to pay off
    config.max_new_tokens = 8
    assert is_compiled(fast.decode_step_fn(model, config))  # auto: already compiled, reused
    config.disable_compile = True
    assert not is_compiled(fast.decode_step_fn(model, config))


# ------------------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def real_bf16(default_gguf):
    return qwen2.Qwen2ForCausalLM.from_pretrained(str(default_gguf), dtype=torch.bfloat16).eval()


@pytest.mark.slow
@needs_onednn
def test_eager_decode_linears_on_real_weights(real_bf16):
    for rows in (1, 8):
        x = torch.randn(rows, 896, dtype=torch.bfloat16)
        for linear in (real_bf16.model.layers[3].mlp.gate_proj, real_bf16.model.layers[5].self_attn.q_proj,
                       real_bf16.lm_head):
            _onednn_equals_f_linear(linear, x)


@pytest.mark.slow
def test_row_paths_on_real_weights(real_bf16):
    """bf16 and int8 compiled single-row products on the real model's q_proj (bias), down_proj (K = 4864)."""
    layer = real_bf16.model.layers[7]
    x = torch.randn(1, 1, 896, dtype=torch.bfloat16)
    for module, inputs in ((layer.self_attn.q_proj, x), (layer.mlp.down_proj, torch.randn(1, 1, 4864).bfloat16())):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(module.weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            expected = F.linear(inputs.double(), linear.weight.double(),
                                None if linear.bias is None else linear.bias.double())
        _assert_int8_compiled_row_matches_dequantized(linear, inputs)
        torch.testing.assert_close(_compiled_single_row(linear, inputs).double(), expected, rtol=8e-3, atol=2e-3)


@pytest.mark.slow
@pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="no AVX512-BF16 on this CPU")
def test_row_kernels_on_real_weights_and_greedy_batch(real_bf16, default_gguf):
    """bf16_rows on the real lm_head (its first rows) and a down_proj (K = 4864) at 8 and 16 rows: within float32
    rounding of the float64 product; int8_rows on the quantised down_proj: its integer reference's bits; and 8
    prompts decoded eagerly follow oneDNN's greedy tokens but at near-ties (the sums are rounded differently)."""
    from test_row_kernels import _int8_reference, assert_bf16_rows_close

    from qwen2.quantization import kernels
    from qwen2.quantization.int8 import quantize_int8

    require_int8_kernels()
    head, down = real_bf16.lm_head.weight[:4099].detach(), real_bf16.model.layers[11].mlp.down_proj.weight.detach()
    for rows in (8, 16):
        for w in (head, down):
            x = torch.randn(rows, w.shape[1]).to(torch.bfloat16)
            assert_bf16_rows_close(kernels.bf16_rows(x, w, None), x, w, None)
        codes, scales = quantize_int8(down, torch.bfloat16)
        assert torch.equal(kernels.int8_rows(x, codes, scales, None, 32767), _int8_reference(x, codes, scales, None, 32767))

    tokenizer = qwen2.AutoTokenizer.from_pretrained(str(default_gguf))
    tokenizer.padding_side = "left"
    prompts = ["def fib(n):", "Write a haiku about rust.", "SELECT * FROM", "# quicksort in C\n", "1, 1, 2, 3, 5,",
               "The capital of France is", "import numpy as np\n", "class Stack:"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=10, do_sample=False, disable_compile=True, return_dict_in_generate=True,
                  output_logits=True)
    with mock.patch.object(fast.settings, "row_kernels", False):
        onednn = real_bf16.generate(**inputs, **kwargs)
    rows = real_bf16.generate(**inputs, **kwargs)
    # The first step's hidden states are the same (the prompt's 8 x L rows go to oneDNN); only the 8-row lm_head
    # differs: by at most one bf16 step of each logit.
    first, reference = rows.logits[0].float(), onednn.logits[0].float()
    assert ((first - reference).abs() <= 2.0 ** -7 * reference.abs() + 1e-6).all()
    # Greedy decoding follows oneDNN's tokens until a near-tie in bf16 logits (steps of 0.125 at 16-32), where
    # the other rounding may pick the other token: there oneDNN's logits of the two are at most 4 steps apart.
    start = inputs["input_ids"].shape[1]
    for b in range(len(prompts)):
        ours, theirs = rows.sequences[b, start:], onednn.sequences[b, start:]
        parted = (ours != theirs).nonzero()
        if len(parted):
            step = parted[0].item()
            logits = onednn.logits[step][b].float()
            print(f"prompt {b} parts at step {step}: gap {logits[theirs[step]] - logits[ours[step]]:.3f}")
            assert logits[theirs[step]] - logits[ours[step]] <= 0.5


def _seed_prompt(default_gguf) -> torch.Tensor:
    seed = json.loads((REFERENCE_DIR / "seed_prompt_greedy.json").read_text(encoding="utf-8"))
    tokenizer = qwen2.AutoTokenizer.from_pretrained(str(default_gguf))
    return tokenizer(seed["rendered_prompt"], return_tensors="pt")["input_ids"]


def _eager_and_compiled(model, prompt: torch.Tensor, hf_gguf_model):
    """(eager, compiled) 12-token greedy outputs with per-step logits, and transformers' float32 logits at the
    same steps (teacher-forced on the eager tokens)."""
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    eager = model.generate(prompt, disable_compile=True, **kwargs)
    compiled = model.generate(prompt, disable_compile=False, **kwargs)
    assert not fast.compiled_step(model).failed
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    with torch.no_grad():
        float32 = hf_gguf_model(eager.sequences[:, :-1]).logits[0, prompt.shape[1] - 1:]
    return torch.stack(eager.logits)[:, 0], torch.stack(compiled.logits)[:, 0], float32


@pytest.mark.slow
def test_fast_path_greedy_equals_eager_on_seed_prompt(real_bf16, default_gguf, hf_gguf_model, plain_settings):
    """bf16: compiled decoding of the seed prompt gives the eager path's greedy tokens, and its per-step logits
    are as close to transformers' float32 ones as eager's are (the two differ only in bf16 rounding: summation
    order, fused operations)."""
    eager, compiled, float32 = _eager_and_compiled(real_bf16, _seed_prompt(default_gguf), hf_gguf_model)
    errors = [((logits - float32).norm() / float32.norm()).item() for logits in (eager, compiled)]
    print(f"relative logit error vs transformers fp32: eager {errors[0]:.2e}, compiled {errors[1]:.2e}; "
          f"max |compiled - eager| {(compiled - eager).abs().max():.3f}")
    assert errors[1] <= BF16_COMPILED_ERROR_RATIO * errors[0]


@pytest.mark.slow
def test_fast_path_float32_matches_transformers(default_gguf, hf_gguf_model, plain_settings):
    """float32: compiled and eager decoding of the seed prompt both give transformers' float32 logits at each of
    12 steps to 1e-4 (only summation order differs; measured 2.2e-5 for both)."""
    model = qwen2.Qwen2ForCausalLM.from_pretrained(str(default_gguf), dtype=torch.float32).eval()  # compiled: its own
    eager, compiled, float32 = _eager_and_compiled(model, _seed_prompt(default_gguf), hf_gguf_model)
    print(f"max |logit - transformers fp32|: eager {(eager - float32).abs().max():.2e}, "
          f"compiled {(compiled - float32).abs().max():.2e}")
    for logits in (eager, compiled):
        torch.testing.assert_close(logits, float32, rtol=0, atol=1e-4)
