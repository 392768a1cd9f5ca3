"""The fast decode path generate() uses: oneDNN-packed CPU weights and a `torch.compile`d decode step.

Both are performance knobs outside the model (the model stays plain eager PyTorch):
- `prepare_model` swaps a CPU model's float linears for `PackedLinear` on its first generate() (2x faster
  small-batch matmuls, see qwen2.packed_linear); `qwen2.packed_linear.unpack_linears(model)` undoes it.
- `decode_step_fn` returns the model's `_decode_step`, compiled once per model with inductor and cached on it,
  so a later generate() with the same shapes (batch, cache length) reuses the compiled code. If compilation
  fails the step logs a warning and stays eager for that model.

`settings` is the module-level switch (no environment variables); generate(disable_compile=True) opts one
call out, disable_compile=False forces compilation (the way to get it on the CPU, see FastPathSettings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen2.packed_linear import pack_linears

logger = logging.getLogger(__name__)

_CACHE_BUCKET = 256


@dataclass
class FastPathSettings:
    pack_linears: bool = True  # pack float CPU linears at the first generate()
    # None (auto): compile on accelerators when a call decodes at least `compile_min_new_tokens`; never on the
    # CPU, where a cold compile of the default model takes ~40 s on 2 cores and saves ~7 ms per token (eager
    # with packed weights is already within ~15% of compiled), so it would pay off only after ~5000 tokens.
    compile: bool | None = None
    compile_min_new_tokens: int = 256


settings = FastPathSettings()


def prepare_model(model: nn.Module) -> None:
    """Pack the model's float CPU linears once (inference only: a model in training mode is left alone)."""
    if settings.pack_linears and not model.training and not getattr(model, "_qwen2_packed", False):
        pack_linears(model)
        model._qwen2_packed = True


def cache_length(max_length: int) -> int:
    """Static cache length for `max_length` tokens: rounded up to a power of two (at least 256), so calls with
    different prompt lengths share one compiled decode step. The extra slots are never written and are masked."""
    length = _CACHE_BUCKET
    while length < max_length:
        length *= 2
    return length


def _wants_compile(model: nn.Module, config: Any) -> bool:
    disable = getattr(config, "disable_compile", None)
    if disable is not None:
        return not disable
    if settings.compile is not None:
        return settings.compile
    if getattr(model, "_qwen2_decode_step", None) is not None:
        return True  # already compiled (or failed): reuse it
    if next(model.parameters()).device.type == "cpu":
        return False
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    return new_tokens >= settings.compile_min_new_tokens


class CompiledDecodeStep:
    """`torch.compile` of a model's decode step with an eager fallback when compilation fails."""

    def __init__(self, model: nn.Module) -> None:
        self.eager = model._decode_step
        self.compiled = torch.compile(model._decode_step, dynamic=False, options={"emulate_precision_casts": True})
        self.failed = False

    def __call__(self, *args: Any) -> torch.Tensor:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure must degrade to eager, not crash
                self.failed = True
                logger.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly instead.",
                               type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return self.eager(*args)


def decode_step_fn(model: nn.Module, config: Any) -> Any:
    """The callable generate() calls for every new token."""
    if not _wants_compile(model, config):
        return model._decode_step
    step = getattr(model, "_qwen2_decode_step", None)
    if step is None:
        step = CompiledDecodeStep(model)
        model._qwen2_decode_step = step
    return step
