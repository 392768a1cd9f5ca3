"""Weight-only quantisation (int8 per channel, int4 per group) as a state-dict transform plus a module swap.

The shape of gpt-fast's quantize.py: a handler turns a float model's weights into quantised tensors
(`create_quantized_state_dict`) and swaps each `nn.Linear` for a module that holds such tensors
(`convert_for_runtime`). The scheme is recorded on the model as `config.quantization_config`, which
`save_pretrained` writes to config.json, so a saved quantised checkpoint reloads without re-quantising:

    model = quantize_model(model, "int4", group_size=32)            # in place, layer by layer
    model.save_pretrained(out_dir)
    # loading: build the float skeleton, then
    convert_for_runtime(model, config.quantization_config)           # same swap, empty modules
    model.load_state_dict(quantised_state_dict, assign=True)

Every `nn.Linear` is converted (the attention and MLP projections and `lm_head`) except the names in
`modules_to_not_convert`, an `lm_head` tied to the input embeddings, and the weights int4 cannot take (see
`int4.check_shape`); all of them are recorded in `modules_to_not_convert`, so a reload converts exactly the
same modules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

from torch import Tensor, nn

from qwen2.quantization.int4 import GROUP_SIZES, Int4WeightOnlyLinear, check_shape, pack_nibbles, quantize_int4
from qwen2.quantization.int8 import Int8WeightOnlyLinear, quantize_int8

logger = logging.getLogger(__name__)

QUANT_METHOD = "qwen2_weight_only"
SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32

__all__ = [
    "DEFAULT_GROUP_SIZE", "GROUP_SIZES", "QUANT_METHOD", "SCHEMES", "Int4Handler", "Int4WeightOnlyLinear",
    "Int8Handler", "Int8WeightOnlyLinear", "QuantHandler", "convert_for_runtime", "get_handler",
    "handler_from_config", "is_quantized", "quantize_model",
]


class QuantHandler(Protocol):
    """What a quantisation scheme provides (gpt-fast's QuantHandler, with the model passed per call)."""

    scheme: str

    def create_quantized_state_dict(self, model: nn.Module) -> dict[str, Tensor]: ...

    def convert_for_runtime(self, model: nn.Module) -> nn.Module: ...

    def quantization_config(self) -> dict[str, Any]: ...


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

    def _empty(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def _from_linear(self, linear: nn.Linear) -> nn.Module:
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
            _set_submodule(model, name, self._empty(linear))
        return model

    def quantize(self, model: nn.Module) -> nn.Module:
        """Quantise in place one Linear at a time, so peak memory grows by one layer, not one model."""
        for name, linear in list(self.targets(model)):
            _set_submodule(model, name, self._from_linear(linear))
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

    def _empty(self, linear: nn.Linear) -> nn.Module:
        return Int8WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                    device=linear.weight.device, dtype=linear.weight.dtype)

    def _from_linear(self, linear: nn.Linear) -> nn.Module:
        return Int8WeightOnlyLinear.from_linear(linear)


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

    def _empty(self, linear: nn.Linear) -> nn.Module:
        return Int4WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                    self.group_size, device=linear.weight.device, dtype=linear.weight.dtype)

    def _from_linear(self, linear: nn.Linear) -> nn.Module:
        return Int4WeightOnlyLinear.from_linear(linear, self.group_size)

    def quantization_config(self) -> dict[str, Any]:
        return {**super().quantization_config(), "group_size": self.group_size}


def get_handler(scheme: str, group_size: int | None = None,
                modules_to_not_convert: tuple[str, ...] | list[str] = ()) -> QuantHandler:
    """The handler for `scheme` ("int8" or "int4"; int4 takes `group_size`, default 32)."""
    if scheme == "int8":
        if group_size is not None:
            raise ValueError("int8 is quantised per output channel and takes no group_size")
        return Int8Handler(tuple(modules_to_not_convert))
    if scheme == "int4":
        return Int4Handler(DEFAULT_GROUP_SIZE if group_size is None else group_size, tuple(modules_to_not_convert))
    raise ValueError(f"Unknown quantisation scheme {scheme!r}; choose one of {SCHEMES}")


def handler_from_config(quantization_config: dict[str, Any]) -> QuantHandler:
    """The handler a checkpoint's `quantization_config` (as written by `quantize_model`) describes."""
    method = quantization_config.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config has quant_method={method!r}; qwen2 can only load its own "
                         f"weight-only checkpoints (quant_method={QUANT_METHOD!r})")
    return get_handler(quantization_config.get("scheme", ""), quantization_config.get("group_size"),
                       quantization_config.get("modules_to_not_convert", ()))


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None,
                   modules_to_not_convert: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """Quantise `model`'s Linear weights in place and record the scheme in `model.config.quantization_config`."""
    if getattr(getattr(model, "config", None), "quantization_config", None):
        raise ValueError(f"This model is already quantised ({model.config.quantization_config}); "
                         "load the float checkpoint to quantise it with another scheme")
    from qwen2.packed_linear import unpack_linears

    if unpack_linears(model):  # generate() packed the float linears for oneDNN: quantise the plain ones
        model._qwen2_packed = False  # so the linears left in float are packed again on the next generate()
    skip = tuple(modules_to_not_convert)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and "lm_head" not in skip:
        # The head shares the embedding matrix; tie_weights() on reload would overwrite a quantised head with it.
        logger.info("Keeping the tied lm_head in floating point (it shares the input embedding matrix)")
        skip += ("lm_head",)
    handler = get_handler(scheme, group_size, skip)
    handler.quantize(model)
    if hasattr(model, "config"):
        model.config.quantization_config = handler.quantization_config()
    return model


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

