"""The fast decode path generate() uses: a `torch.compile`d decode step, or oneDNN linears when eager.

Both are performance knobs outside the model: generate() never changes the model the user holds (its modules,
parameters and state dict stay as they are, so it can still be moved, trained, wrapped by peft or saved), and
nothing here copies a weight. The only state kept is the compiled step, in a registry keyed weakly by model.
- compiled: the model's `_decode_step` under `torch.compile` with inductor. The graph takes the model's
  parameters and buffers as inputs (dynamo lifts them), so it always reads the current weights: in-place
  updates (an optimizer step, `load_state_dict`, peft's merge) need nothing, and replaced tensors, dtypes or
  modules fail its guards and recompile it. While tracing, `DecodeLinears` writes each single-row
  `F.linear` as `row_linear.row_matvec`, a reduction inductor streams the weight through at ~2x oneDNN's
  bf16 gemv, and sends bfloat16 ones of 2 to 16 rows to `kernels.bf16_rows` (an operator the graph calls).
  The cache length is a dynamic dimension, so one graph serves every prompt and context length, and so is
  the batch from two rows on: one more graph serves every batch. If compilation fails the step logs a
  warning and stays eager.
- eager: on the CPU `DecodeLinears` sends bfloat16 `F.linear` calls of up to 16 rows to `kernels.bf16_rows`
  where the CPU has AVX512-BF16 (each weight row read once per 8 rows: at 8 rows about as fast as oneDNN on
  the blocked copies generate() used to keep, which doubled the weights' memory, and ~2x oneDNN on the weight
  as it is; README), the others to oneDNN's inner product on the weight as it is (F.linear's bits, faster
  than `F.linear`'s bf16 matmul at one row).

When to compile (`_wants_compile`): `generate(disable_compile=...)` decides if given, else `settings.compile`,
else auto: a call of at least `compile_min_new_tokens` new tokens, or on a model whose step is already
compiled. On the CPU the compiled step is ~1.5x faster at one row (bf16; int8 ~1.7x) and ~1.2-1.3x at 8
(the eager step's Python and unfused element-wise work), while the first compile of the default model costs
~40-90 s on 2 cores (inductor's on-disk cache makes it ~10-15 s in later processes).
"""

from __future__ import annotations

import functools
import logging
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qwen2.quantization import Int8WeightOnlyLinear, kernels
from qwen2.row_linear import row_linear

logger = logging.getLogger(__name__)

_CACHE_BUCKET = 256


@dataclass
class FastPathSettings:
    row_kernels: bool = True  # eager decoding of up to 16 rows on AVX512-BF16: bfloat16 linears by kernels.bf16_rows
    onednn_linears: bool = True  # other eager bfloat16 linears on the CPU: oneDNN's inner product
    compile: bool | None = None  # None: auto (see the module docstring)
    compile_min_new_tokens: int = 512


settings = FastPathSettings()


@functools.cache
def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class DecodeLinears(TorchFunctionMode):
    """Computes the `F.linear` calls of a decode step (the model's own `nn.Linear`s, or peft's around them)
    the fast way for the CPU, reading the weight each call: bfloat16 rows through `kernels.bf16_rows` (but
    single rows as `row_matvec` while compiling), other bfloat16 ones through oneDNN's inner product eagerly
    (no autograd there: only without grad)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            same_dtype = x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)  # else F.linear raises
            if same_dtype and x.device.type == "cpu" and weight.device.type == "cpu":
                single_row = x.numel() == x.shape[-1]
                compiling = torch.compiler.is_compiling()
                if (settings.row_kernels and not torch.is_grad_enabled() and not (compiling and single_row)
                        and kernels.bf16_rows_usable(x, weight)):
                    return kernels.bf16_rows(x, weight, bias)
                if compiling:
                    if single_row:
                        return row_linear(x, weight, bias)
                elif x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
                    if settings.onednn_linears and _onednn_bf16():
                        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


def _with_decode_linears(model: nn.Module, *args: Any) -> Tensor:
    with DecodeLinears():
        return model._decode_step(*args)


def cache_length(max_length: int) -> int:
    """Static cache length for `max_length` tokens: rounded up to a power of two (at least 256), so calls with
    different prompt lengths share a few shapes even where a compiler specialises on the length. The extra
    slots are never written and are masked."""
    length = _CACHE_BUCKET
    while length < max_length:
        length *= 2
    return length


class CompiledDecodeStep:
    """`torch.compile` of a model's decode step with an eager fallback when compilation fails. Holds no
    reference to the model (it is called with it), so the registry below lets the model go."""

    def __init__(self, step: Callable[..., Tensor] | None = None, what: str = "decode step") -> None:
        # A code object of its own: dynamo keeps compiled graphs, and its limit of recompilations (8), per code
        # object, so one model's step neither uses up another's budget (which silently decodes eagerly) nor
        # outlives its model in dynamo's cache. `step` (the decode step's signature): another step compiled
        # the same way (speculative decoding's verification).
        step = step or _with_decode_linears
        self.step = step
        self.what = what
        own = types.FunctionType(step.__code__.replace(), step.__globals__)
        self.compiled = torch.compile(own, dynamic=False, options={"emulate_precision_casts": True})
        self.failed = False
        self.compiled_once = False
        self._marked_cache: Any = lambda: None  # weakref to the cache last marked: once per generate(), not per token

    def __call__(self, model: nn.Module, *args: Any) -> Tensor:
        if not self.failed:
            if self._marked_cache() is not args[4]:
                _mark_dynamic(args[0], args[1], args[3], args[4])
                self._marked_cache = weakref.ref(args[4])
            try:
                if self.compiled_once:
                    return self.compiled(model, *args)
                return self._first_call(model, args)
            except Exception as err:  # noqa: BLE001 - any compiler failure must degrade to eager, not crash
                self.failed = True
                logger.warning("torch.compile of the %s failed (%s: %s); decoding eagerly instead.", self.what,
                               type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return self.step(model, *args)

    def _first_call(self, model: nn.Module, args: tuple) -> Tensor:
        logger.info("Compiling the %s with torch.compile: ~40 s on 2 cores the first time on a machine, "
                    "~10 s once inductor's on-disk cache has it (generate(disable_compile=True) skips it).", self.what)
        start = time.perf_counter()
        logits = self.compiled(model, *args)
        self.compiled_once = True
        logger.info("%s compiled in %.1f s.", self.what.capitalize(), time.perf_counter() - start)
        return logits


# model -> its compiled step; weak, so that the step neither shows in the model nor keeps it alive.
_compiled_steps: weakref.WeakKeyDictionary[nn.Module, CompiledDecodeStep] = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module) -> CompiledDecodeStep | None:
    """The model's compiled decode step, if a generate() call made one."""
    return _compiled_steps.get(model)


def _mark_dynamic(tokens: Tensor, position_ids: Tensor, attention_mask: Tensor | None, cache: Any) -> None:
    """The cache length is a dynamic dimension, and so is the batch from two rows on: one graph serves every
    context length and one more every several-row batch (a recompile per batch size would cost ~10-60 s)."""
    several = tokens.shape[0] > 1
    for layer in cache.layers:
        for buffer in (layer.keys, layer.values):
            if layer.window is None:
                torch._dynamo.maybe_mark_dynamic(buffer, 2)
            if several:
                torch._dynamo.maybe_mark_dynamic(buffer, 0)
    if attention_mask is not None:
        torch._dynamo.maybe_mark_dynamic(attention_mask, 1)
    if several:
        for tensor in (tokens, position_ids) + (() if attention_mask is None else (attention_mask,)):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def _wants_compile(model: nn.Module, config: Any) -> bool:
    """Whether a generate() call uses the compiled step."""
    disable = getattr(config, "disable_compile", None)
    if disable is not None:
        return not disable
    if settings.compile is not None:
        return settings.compile
    step = compiled_step(model)
    if step is not None:
        return not step.failed  # already compiled: reuse it
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    return new_tokens >= settings.compile_min_new_tokens


def decode_step_fn(model: nn.Module, config: Any) -> Any:
    """The callable generate() calls for every new token (the signature of `model._decode_step`)."""
    if not _wants_compile(model, config):
        return functools.partial(_with_decode_linears, model)
    if next(model.parameters()).device.type == "cpu" and (
            any(isinstance(m, Int8WeightOnlyLinear) for m in model.modules())
            or any(p.dtype == torch.bfloat16 for p in model.parameters())):
        kernels.load()  # before tracing: int8 and bf16 linears pick their row kernel while being compiled
    step = _compiled_steps.get(model)
    if step is None:
        step = _compiled_steps[model] = CompiledDecodeStep()
    return functools.partial(step, model)
