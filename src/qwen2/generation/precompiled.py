"""A decode step compiled once and kept on disk: later processes load it instead of compiling.

`torch.compile` spends most of a warm start in dynamo re-tracing the model (inductor's caches only skip code
generation), so saving inductor's caches (`torch.compiler.save_cache_artifacts`) left ~20 s per start on the
default model. PyTorch's precompile (`torch.compile(...).aot_compile`, `torch.compiler.load_compiled_function`)
saves the traced bytecode, its guards and inductor's output together; loading it traces nothing. The graph
takes the model's parameters as inputs (the model is an argument, as in generation.fast), so the file holds
no weights and always reads the current ones. Inductor's compiled C++ kernels stay in inductor's cache
directory: if they are gone, loading rebuilds them from the saved sources (slower, still no tracing).

`PrecompiledDecodeStep` is the decode step generate() uses meanwhile: eager until a loaded function is set
(from any thread), then compiled from the next token on, and eager for any call the function's guards
refuse (another batch size, dtype or mask shape), so it never fails a generate() call.
"""

from __future__ import annotations

import logging
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qwen2.generation import fast

logger = logging.getLogger(__name__)


class PrecompiledDecodeStep:
    """The decode step of a model whose compiled step is loaded later: eager until `function` is set."""

    failed = False  # generate() may pick it whatever its state: it falls back to eager by itself

    def __init__(self) -> None:
        self.function: Any = None
        self.compiled_calls = 0  # decode steps run by the loaded function (tests, `/show`)

    def __call__(self, model: nn.Module, *args: Any) -> Tensor:
        function = self.function
        if function is not None and function.guard_check(model, *args):
            self.compiled_calls += 1
            return function(model, *args)
        return fast._with_decode_linears(model, *args)


def install(model: nn.Module) -> PrecompiledDecodeStep:
    """Make a `PrecompiledDecodeStep` the compiled step generate() uses for `model` (weakly kept, as fast's)."""
    step = PrecompiledDecodeStep()
    fast._compiled_steps[model] = step
    return step


class _Capture:
    """Stands in for the compiled step during one generate() call to record a decode step's arguments."""

    failed = False

    def __init__(self) -> None:
        self.args: tuple | None = None

    def __call__(self, model: nn.Module, *args: Any) -> Tensor:
        if self.args is None:
            self.args = args
        return fast._with_decode_linears(model, *args)


def _decode_step_arguments(model: nn.Module) -> tuple:
    """A real decode step's arguments for one row with an attention mask (what the chat's tokenizer gives)."""
    capture = _Capture()
    previous = fast._compiled_steps.get(model)
    fast._compiled_steps[model] = capture
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                       do_sample=False, disable_compile=False)
    finally:
        if previous is None:
            del fast._compiled_steps[model]
        else:
            fast._compiled_steps[model] = previous
    if capture.args is None:
        raise RuntimeError("generate() ran no decode step to compile")
    return capture.args


def save(model: nn.Module, path: Path) -> float:
    """Compile `model`'s single-row decode step and write it to `path`; the seconds compiling took."""
    started = time.perf_counter()
    threads = torch.get_num_threads()  # the guards record the thread count: a step compiled for another is refused
    if next(model.parameters()).device.type == "cpu":
        from qwen2.quantization import Int8WeightOnlyLinear, kernels

        if any(isinstance(m, Int8WeightOnlyLinear) for m in model.modules()):
            kernels.load()  # before tracing, as generate() does: the layers pick their kernel while traced
    args = _decode_step_arguments(model)
    torch.set_num_threads(threads)  # as a precaution: an extension's OpenMP start-up in the warm-up may reset it
    fast._mark_dynamic(args[0], args[1], args[3], args[4])  # one graph for every context length
    # A code object of its own, as fast.CompiledDecodeStep's, so dynamo's per-code limits stay apart.
    step = types.FunctionType(fast._with_decode_linears.__code__.replace(), fast._with_decode_linears.__globals__)
    with torch.no_grad():  # generate() decodes without grad: the guards check the grad mode
        compiled = torch.compile(step, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})
        function = compiled.aot_compile(((model, *args), {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    function.save_compiled_function(str(path))  # written to a temporary file and renamed: never half a file
    seconds = time.perf_counter() - started
    logger.info("Compiled the decode step in %.1f s and saved it to %s", seconds, path)
    return seconds


def load(path: Path) -> Any:
    """The compiled decode step saved at `path` (call it as `function(model, *decode_step_args)`)."""
    with open(path, "rb") as file:
        function = torch.compiler.load_compiled_function(file)
    function.disable_guard_check()  # PrecompiledDecodeStep checks the guards itself, to fall back to eager
    return function
