"""The fast decode path generate() uses: a `torch.compile`d decode step, or oneDNN-packed weights when eager.

Both are performance knobs outside the model (the model stays plain eager PyTorch). `decode_step_fn` picks
the path for a generate() call and readies the model's float linears for it:
- compiled: the model's `_decode_step` compiled once per model with inductor and cached on it; the cache
  length is a dynamic dimension, so one compiled graph serves every prompt and context length. The linears
  become `RowLinear` (same weights), whose single-row product inductor turns into a reduction streaming the
  weight at ~2x oneDNN's bf16 gemv (qwen2.row_linear). If compilation fails the step logs a warning and
  stays eager.
- eager: on the CPU the linears become `PackedLinear` (oneDNN's blocked layout, ~2x plain `F.linear` at a
  few rows; see qwen2.packed_linear); `qwen2.packed_linear.unpack_linears(model)` undoes it.

When to compile (`_wants_compile`): `generate(disable_compile=...)` decides if given, else `settings.compile`,
else auto. On the CPU auto compiles only single-row decoding of at least `compile_min_new_tokens` tokens:
there it is ~1.5x faster (bf16; int8 ~1.7x), while several rows are as fast eager with packed weights
(measured at 8 rows), and the first compile of the default model costs ~40 s on 2 cores (inductor's on-disk
cache makes it ~10-15 s in later processes). On accelerators auto compiles any batch from
`compile_min_new_tokens` on.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qwen2.packed_linear import pack_linears, unpack_linears
from qwen2.quantization import Int8WeightOnlyLinear, kernels
from qwen2.row_linear import RowLinear

logger = logging.getLogger(__name__)

_CACHE_BUCKET = 256


@dataclass
class FastPathSettings:
    pack_linears: bool = True  # eager decoding on the CPU: oneDNN-packed float linears
    compile: bool | None = None  # None: auto (see the module docstring)
    compile_min_new_tokens: int = 512


settings = FastPathSettings()


def _set_linear_class(model: nn.Module, old: type, new: type) -> None:
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new  # same parameters and state dict; only forward differs


def prepare_model(model: nn.Module, compiled: bool) -> None:
    """Ready the model's float linears for the decode path chosen (inference only: a model in training mode
    is left alone)."""
    if model.training:
        return
    on_cpu = next(model.parameters()).device.type == "cpu"
    if compiled:
        if getattr(model, "_qwen2_packed", False):
            unpack_linears(model)
            model._qwen2_packed = False
        _set_linear_class(model, nn.Linear, RowLinear)
        if on_cpu and any(isinstance(m, Int8WeightOnlyLinear) for m in model.modules()):
            kernels.load()  # before tracing: the int8 layers pick their single-row kernel while being compiled
    elif on_cpu and settings.pack_linears and not getattr(model, "_qwen2_packed", False):
        _set_linear_class(model, RowLinear, nn.Linear)
        pack_linears(model)
        model._qwen2_packed = True


def cache_length(max_length: int) -> int:
    """Static cache length for `max_length` tokens: rounded up to a power of two (at least 256), so calls with
    different prompt lengths share a few shapes even where a compiler specialises on the length. The extra
    slots are never written and are masked."""
    length = _CACHE_BUCKET
    while length < max_length:
        length *= 2
    return length


def _wants_compile(model: nn.Module, config: Any, rows: int) -> bool:
    """Whether a generate() call decoding `rows` sequences uses the compiled step."""
    disable = getattr(config, "disable_compile", None)
    if disable is not None:
        return not disable
    if settings.compile is not None:
        return settings.compile
    step = getattr(model, "_qwen2_decode_step", None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and rows > 1:
        return False
    if step is not None:
        return not step.failed  # already compiled: reuse it
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    return new_tokens >= settings.compile_min_new_tokens


class CompiledDecodeStep:
    """`torch.compile` of a model's decode step with an eager fallback when compilation fails."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.compiled = torch.compile(model._decode_step, dynamic=False, options={"emulate_precision_casts": True})
        self.failed = False
        self.compiled_once = False
        self._marked_cache: Any = lambda: None  # weakref to the cache last marked: once per generate(), not per token

    def __call__(self, *args: Any) -> torch.Tensor:
        if not self.failed:
            if self._marked_cache() is not args[4]:
                _mark_cache_length_dynamic(args[3], args[4])
                self._marked_cache = weakref.ref(args[4])
            try:
                if self.compiled_once:
                    return self.compiled(*args)
                return self._first_call(args)
            except Exception as err:  # noqa: BLE001 - any compiler failure must degrade to eager, not crash
                self.failed = True
                logger.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly instead.",
                               type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                prepare_model(self.model, compiled=False)
        return self.model._decode_step(*args)

    def _first_call(self, args: tuple) -> torch.Tensor:
        logger.info("Compiling the decode step with torch.compile: ~40 s on 2 cores the first time on a machine, "
                    "~10 s once inductor's on-disk cache has it (generate(disable_compile=True) skips it).")
        start = time.perf_counter()
        logits = self.compiled(*args)
        self.compiled_once = True
        logger.info("Decode step compiled in %.1f s.", time.perf_counter() - start)
        return logits


def _mark_cache_length_dynamic(attention_mask: Tensor | None, cache: Any) -> None:
    for layer in cache.layers:
        if layer.window is None:
            torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
            torch._dynamo.maybe_mark_dynamic(layer.values, 2)
    if attention_mask is not None:
        torch._dynamo.maybe_mark_dynamic(attention_mask, 1)


def decode_step_fn(model: nn.Module, config: Any, rows: int) -> Any:
    """The callable generate() calls for every new token; readies the model's linears for it."""
    compiled = _wants_compile(model, config, rows)
    prepare_model(model, compiled)
    if not compiled:
        return model._decode_step
    step = getattr(model, "_qwen2_decode_step", None)
    if step is None:
        step = CompiledDecodeStep(model)
        model._qwen2_decode_step = step
    return step
