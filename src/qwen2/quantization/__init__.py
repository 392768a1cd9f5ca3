"""Quantisation (int8 per channel, int4 per group, both weight-only; W8A8: int8 weights and per-token int8
activations) as a state-dict transform plus a module swap.

The shape of gpt-fast's quantize.py: a handler turns a float model's weights into quantised tensors
(`create_quantized_state_dict`) and swaps each `nn.Linear` for a module that holds such tensors
(`convert_for_runtime`). The scheme is recorded on the model as `config.quantization_config`, which
`save_pretrained` writes to config.json, so a saved quantised checkpoint reloads without re-quantising:

    model = quantize_model(model, "int4", group_size=32)            # in place, layer by layer
    model.save_pretrained(out_dir)
    # loading: build the float skeleton, then
    convert_for_runtime(model, config.quantization_config)           # same swap, empty modules
    model.load_state_dict(quantised_state_dict, assign=True)

Quantising while loading (`QuantizingLoader`, what `from_pretrained(quantization=...)` uses) swaps the modules
first and quantises each weight as it is read, a few thousand rows at a time, so no float copy of the model
(or of a 151936-row head) is ever held; a GGUF's Q4_0/Q4_1/Q4_K blocks become int4 codes as they are
(`gguf.py`).

Every `nn.Linear` is converted (the attention and MLP projections and `lm_head`) except the names in
`modules_to_not_convert`, an `lm_head` tied to the input embeddings, and the weights int4 cannot take (see
`int4.check_shape`); all of them are recorded in `modules_to_not_convert`, so a reload converts exactly the
same modules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from qwen2.quantization.gguf import int4_from_gguf
from qwen2.quantization.int4 import GROUP_SIZES, Int4WeightOnlyLinear, check_shape, pack_nibbles, quantize_int4
from qwen2.quantization.int8 import Int8DynamicActivationLinear, Int8WeightOnlyLinear, quantize_int8

logger = logging.getLogger(__name__)

QUANT_METHOD = "qwen2_weight_only"
SCHEMES = ("int8", "int4", "w8a8")
DEFAULT_GROUP_SIZE = 32
_SOURCE_CHUNK = 1 << 22  # weights read per chunk when quantising a checkpoint tensor as it loads

__all__ = [
    "DEFAULT_GROUP_SIZE", "GROUP_SIZES", "QUANT_METHOD", "SCHEMES", "Int4Handler", "Int4WeightOnlyLinear",
    "Int8DynamicActivationLinear", "Int8Handler", "Int8WeightOnlyLinear", "QuantHandler", "QuantizingLoader",
    "W8A8Handler", "convert_for_runtime", "get_handler", "handler_from_config", "is_quantized", "quantize_model",
]


class QuantHandler(Protocol):
    """What a quantisation scheme provides (gpt-fast's QuantHandler, with the model passed per call)."""

    scheme: str

    def create_quantized_state_dict(self, model: nn.Module) -> dict[str, Tensor]: ...

    def convert_for_runtime(self, model: nn.Module) -> nn.Module: ...

    def quantize_source(self, source: Any, dtype: torch.dtype) -> dict[str, Tensor]: ...

    def quantization_config(self) -> dict[str, Any]: ...


def _row_chunks(source: Any, dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    """(first row, rows) of a 2-D source read into one reused `dtype` buffer; both schemes work row by row,
    so quantising the chunks gives what quantising the whole weight gives. Chunks are whole multiples of 64
    rows, so each satisfies int4's row-count rule whenever the weight does."""
    n, k = source.shape
    rows = max(64, _SOURCE_CHUNK // k // 64 * 64)
    buffer = torch.empty(min(rows, n), k, dtype=dtype)
    for lo in range(0, n, rows):
        part = buffer[:min(rows, n - lo)]
        source.read_into(part, lo)
        yield lo, part


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """A module name matches a pattern equal to it or to one of its trailing dotted components."""
    return any(name == p or name.endswith("." + p) for p in patterns)


class _WeightOnlyHandler:
    scheme = ""

    def __init__(self, modules_to_not_convert: tuple[str, ...] | list[str] = ()) -> None:
        self.modules_to_not_convert = tuple(modules_to_not_convert)

    def _unsupported(self, linear: nn.Linear) -> str | None:
        return None

    def targets(self, model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
        """(name, module) of every `nn.Linear` this handler converts; records the ones it has to skip."""
        skipped = []
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear or _matches(name, self.modules_to_not_convert):
                continue
            problem = self._unsupported(module)
            if problem:
                logger.warning("Keeping %s in %s: %s", name, module.weight.dtype, problem)
                skipped.append(name)
                continue
            yield name, module
        self.modules_to_not_convert += tuple(skipped)

    def _quantize(self, linear: nn.Linear) -> dict[str, Tensor]:
        raise NotImplementedError

    def _empty(self, linear: nn.Linear, name: str) -> nn.Module:
        raise NotImplementedError

    def _from_linear(self, linear: nn.Linear, name: str) -> nn.Module:
        raise NotImplementedError

    def quantize_source(self, source: Any, dtype: torch.dtype) -> dict[str, Tensor]:
        """A checkpoint weight (a `loading.safetensors.TensorSource`) quantised exactly as `_quantize` would
        quantise it once loaded in `dtype`, without ever holding it whole in floating point."""
        raise NotImplementedError

    def create_quantized_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's state dict with each converted Linear's `weight` replaced by its quantised tensors."""
        state = model.state_dict()
        for name, linear in self.targets(model):
            del state[f"{name}.weight"]
            state.update({f"{name}.{key}": value for key, value in self._quantize(linear).items()})
        return state

    def convert_for_runtime(self, model: nn.Module) -> nn.Module:
        """Swap each converted Linear for an empty quantised module on the same device (meta works)."""
        for name, linear in list(self.targets(model)):
            _set_submodule(model, name, self._empty(linear, name))
        return model

    def quantize(self, model: nn.Module) -> nn.Module:
        """Quantise in place one Linear at a time, so peak memory grows by one layer, not one model."""
        for name, linear in list(self.targets(model)):
            _set_submodule(model, name, self._from_linear(linear, name))
        return model

    def quantization_config(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "scheme": self.scheme,
                "modules_to_not_convert": list(self.modules_to_not_convert)}


class Int8Handler(_WeightOnlyHandler):
    """Symmetric int8, one scale per output channel."""

    scheme = "int8"

    def _quantize(self, linear: nn.Linear) -> dict[str, Tensor]:
        q, scales = quantize_int8(linear.weight, scale_dtype=linear.weight.dtype)
        return {"weight": q, "scales": scales}

    def _module_class(self, name: str) -> type[Int8WeightOnlyLinear]:
        return Int8WeightOnlyLinear

    def _empty(self, linear: nn.Linear, name: str) -> nn.Module:
        return self._module_class(name)(linear.in_features, linear.out_features, linear.bias is not None,
                                        device=linear.weight.device, dtype=linear.weight.dtype)

    def _from_linear(self, linear: nn.Linear, name: str) -> nn.Module:
        return self._module_class(name).from_linear(linear)

    def quantize_source(self, source: Any, dtype: torch.dtype) -> dict[str, Tensor]:
        n, k = source.shape
        q, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=dtype)
        for lo, part in _row_chunks(source, dtype):
            q[lo:lo + len(part)], scales[lo:lo + len(part)] = quantize_int8(part, scale_dtype=dtype)
        return {"weight": q, "scales": scales}


class W8A8Handler(Int8Handler):
    """int8's weights (the same tensors), with each input row quantised to int8 on the fly: integer GEMMs for
    prompts, at the cost of activation rounding (see `int8.Int8DynamicActivationLinear`).

    `lm_head` keeps float activations (weight-only int8): its input, the final norm's output, has the model's
    largest outlier channels and its output picks the token, while a prompt runs it on one row (generation
    keeps the last position's logits), so integer GEMMs would gain nothing there. Measured on the default
    model, teacher-forced top-1 agreement with transformers' float32 over the seed answer: 94% this way, 90%
    with the head in W8A8 too (bf16: 98%)."""

    scheme = "w8a8"

    def _module_class(self, name: str) -> type[Int8WeightOnlyLinear]:
        return Int8WeightOnlyLinear if _matches(name, ("lm_head",)) else Int8DynamicActivationLinear


class Int4Handler(_WeightOnlyHandler):
    """Asymmetric int4, one (scale, zero) pair per `group_size` input columns."""

    scheme = "int4"

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE, modules_to_not_convert: tuple[str, ...] = ()) -> None:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size!r} is not supported; use one of {GROUP_SIZES}")
        super().__init__(modules_to_not_convert)
        self.group_size = group_size

    def _unsupported(self, linear: nn.Linear) -> str | None:
        return check_shape(linear.out_features, linear.in_features, self.group_size)

    def _quantize(self, linear: nn.Linear) -> dict[str, Tensor]:
        codes, scales_and_zeros = quantize_int4(linear.weight, self.group_size, scale_dtype=linear.weight.dtype)
        return {"weight": pack_nibbles(codes), "scales_and_zeros": scales_and_zeros}

    def _empty(self, linear: nn.Linear, name: str) -> nn.Module:
        return Int4WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                    self.group_size, device=linear.weight.device, dtype=linear.weight.dtype)

    def _from_linear(self, linear: nn.Linear, name: str) -> nn.Module:
        return Int4WeightOnlyLinear.from_linear(linear, self.group_size)

    def quantize_source(self, source: Any, dtype: torch.dtype) -> dict[str, Tensor]:
        direct = int4_from_gguf(source, self.group_size, dtype)  # Q4_0/Q4_1/Q4_K blocks: the codes as they are
        if direct is not None:
            return direct
        n, k = source.shape
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        scales_and_zeros = torch.empty(k // self.group_size, n, 2, dtype=dtype)
        for lo, part in _row_chunks(source, dtype):
            codes, scales_and_zeros[:, lo:lo + len(part)] = quantize_int4(part, self.group_size, scale_dtype=dtype)
            packed[lo:lo + len(part)] = pack_nibbles(codes)
        return {"weight": packed, "scales_and_zeros": scales_and_zeros}

    def quantization_config(self) -> dict[str, Any]:
        return {**super().quantization_config(), "group_size": self.group_size}


def get_handler(scheme: str, group_size: int | None = None,
                modules_to_not_convert: tuple[str, ...] | list[str] = ()) -> QuantHandler:
    """The handler for `scheme` ("int8", "int4" or "w8a8"; int4 takes `group_size`, default 32)."""
    if scheme in ("int8", "w8a8"):
        if group_size is not None:
            raise ValueError(f"{scheme} is quantised per output channel and takes no group_size")
        return (Int8Handler if scheme == "int8" else W8A8Handler)(tuple(modules_to_not_convert))
    if scheme == "int4":
        return Int4Handler(DEFAULT_GROUP_SIZE if group_size is None else group_size, tuple(modules_to_not_convert))
    raise ValueError(f"Unknown quantisation scheme {scheme!r}; choose one of {SCHEMES}")


def handler_from_config(quantization_config: dict[str, Any]) -> QuantHandler:
    """The handler a checkpoint's `quantization_config` (as written by `quantize_model`) describes."""
    method = quantization_config.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config has quant_method={method!r}; qwen2 can only load its own "
                         f"quantised checkpoints (quant_method={QUANT_METHOD!r})")
    return get_handler(quantization_config.get("scheme", ""), quantization_config.get("group_size"),
                       quantization_config.get("modules_to_not_convert", ()))


def _handler_for(model: nn.Module, scheme: str, group_size: int | None,
                 modules_to_not_convert: tuple[str, ...] | list[str]) -> QuantHandler:
    if getattr(getattr(model, "config", None), "quantization_config", None):
        raise ValueError(f"This model is already quantised ({model.config.quantization_config}); "
                         "load the float checkpoint to quantise it with another scheme")
    skip = tuple(modules_to_not_convert)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and "lm_head" not in skip:
        # The head shares the embedding matrix; tie_weights() on reload would overwrite a quantised head with it.
        logger.info("Keeping the tied lm_head in floating point (it shares the input embedding matrix)")
        skip += ("lm_head",)
    return get_handler(scheme, group_size, skip)


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None,
                   modules_to_not_convert: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """Quantise `model`'s Linear weights in place and record the scheme in `model.config.quantization_config`."""
    handler = _handler_for(model, scheme, group_size, modules_to_not_convert)
    handler.quantize(model)
    if hasattr(model, "config"):
        model.config.quantization_config = handler.quantization_config()
    return model


class QuantizingLoader:
    """Quantisation applied while a checkpoint loads into a meta-built model: the modules and values
    `quantize_model` gives after loading, made one weight at a time.

    Construction swaps the Linears to convert for empty quantised modules; `load` turns one checkpoint weight
    into the tensors of its module.
    """

    def __init__(self, model: nn.Module, scheme: str, group_size: int | None = None,
                 modules_to_not_convert: tuple[str, ...] | list[str] = ()) -> None:
        self.handler = _handler_for(model, scheme, group_size, modules_to_not_convert)
        self.modules: dict[str, nn.Module] = {}  # "<module>.weight" -> its quantised module
        for name, linear in list(self.handler.targets(model)):
            module = self.handler._empty(linear, name)
            _set_submodule(model, name, module)
            self.modules[f"{name}.weight"] = module
        if hasattr(model, "config"):
            model.config.quantization_config = self.handler.quantization_config()

    def load(self, weight_name: str, source: Any, device: torch.device) -> None:
        """Quantise the float weight `source` into its module (`weight` and scales; the bias loads as usual).

        Assigned at once rather than handed back: the module repacks its codes for the CPU kernel as they
        arrive, so the portable copy is freed here instead of piling up until the whole checkpoint is read.
        """
        module = self.modules[weight_name]
        expected = (module.out_features, module.in_features)
        if tuple(source.shape) != expected:
            raise ValueError(f"Tensor {weight_name!r} has shape {tuple(source.shape)} but the model expects "
                             f"{expected}: the checkpoint does not match the config")
        dtype = next(t.dtype for t in module.buffers() if t.is_floating_point())
        tensors = {key: value.to(device) for key, value in self.handler.quantize_source(source, dtype).items()}
        module.load_state_dict(tensors, strict=False, assign=True)


def convert_for_runtime(model: nn.Module, quantization_config: dict[str, Any]) -> nn.Module:
    """Swap in the empty quantised modules a checkpoint's `quantization_config` names, before loading it."""
    handler = handler_from_config(quantization_config)
    handler.convert_for_runtime(model)
    if hasattr(model, "config"):
        model.config.quantization_config = dict(quantization_config)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)) for m in model.modules())

