"""CPU fast path for float `nn.Linear`: weights reordered once into oneDNN's blocked layout.

Why: on the torch CPU builds we ship against, `F.linear` with bfloat16 weights and a few input rows (decoding)
runs a plain-layout kernel at ~9 GB/s per core; the same oneDNN inner product on a weight reordered by
`mkldnn._reorder_linear_weight` streams ~16-18 GB/s per core (2x; measured on the default model's shapes,
M = 1 and 8, with benchmarks/bench_kernels.py-style cache busting). For prompts (M >= 128) both are
compute bound and equal, so one packed copy serves prefill and decode. float32 gains less (~1.2x) but
the same way. The blocked layout is opaque, so it cannot be the storage format: the module swap below keeps
the HF state-dict names (`weight`, `bias`) on save and load and is undone by `unpack_linears`.

Inference only (oneDNN's op has no backward), CPU only: `pack_linears` leaves any other device untouched.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def can_pack(weight: Tensor) -> bool:
    """Whether this build and CPU have oneDNN's packed inner product for `weight`'s dtype and device."""
    if weight.device.type != "cpu" or weight.is_meta or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.library.custom_op("qwen2::packed_linear", mutates_args=())
def _packed_linear_op(x: Tensor, packed_weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """The oneDNN call as an opaque op for torch.compile: inductor's own lowering of `_linear_pointwise`
    only accepts weights it packed itself (freezing), not a packed tensor passed in."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@_packed_linear_op.register_fake
def _(x: Tensor, packed_weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _pack(weight: Tensor) -> Tensor:
    # The batch-size hint picks the blocking; measured equal at 1, 8 and 512 rows with a hint of 1.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


class PackedLinear(nn.Module):
    """`nn.Linear` (inference) with its weight held in oneDNN's packed layout.

    `state_dict()` / `load_state_dict()` see a plain (out, in) `weight`, as `nn.Linear`'s; reading
    `.weight` returns a fresh dense copy (slow: for inspection, not for compute).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed_weight = _pack(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.training = False  # inference only; model.train() turns it on and forward then refuses

    @property
    def weight(self) -> Tensor:
        return self.packed_weight.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError("PackedLinear is inference-only (no backward): call "
                               "qwen2.packed_linear.unpack_linears(model) before training.")
        if x.dtype != self.packed_weight.dtype:
            return F.linear(x, self.weight, self.bias)  # raises nn.Linear's dtype-mismatch error
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.compiler.is_compiling():
            return _packed_linear_op(x, self.packed_weight, bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")  # no op overhead

    def _apply(self, fn, recurse: bool = True):
        """`.to()` / `.float()` / `.cuda()`: repack in the new dtype on the CPU; elsewhere ask for an unpack."""
        weight = fn(self.weight)
        if not can_pack(weight):
            raise RuntimeError(
                f"A PackedLinear cannot move to {weight.device} / {weight.dtype}: call "
                "qwen2.packed_linear.unpack_linears(model) first (generate() packs CPU models' linears)."
            )
        self.packed_weight = _pack(weight)
        return super()._apply(fn, recurse)

    def to_linear(self) -> nn.Linear:
        """The equivalent plain `nn.Linear` (dense weight, same values)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight)  # requires_grad as nn.Linear: compiled graphs guard on it
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach())
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight  # first, as in nn.Linear's order
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the shape in current model is {(self.out_features, self.in_features)}.")
            else:
                self.packed_weight = _pack(weight.to(self.packed_weight.dtype))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.packed_weight.dtype}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def pack_linears(model: nn.Module) -> int:
    """Swap every plain float `nn.Linear` on the CPU (not tied to another module's weight) for a
    `PackedLinear`; returns how many were swapped. Quantised linears and other devices are left alone."""
    shared = {id(p) for name, m in model.named_modules() if type(m) is not nn.Linear
              for p in m.parameters(recurse=False)}
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and id(module.weight) not in shared and can_pack(module.weight):
            _set_submodule(model, name, PackedLinear(module))
            swapped += 1
    if swapped:
        logger.debug("Packed %d linear layers for oneDNN", swapped)
    return swapped


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears` (e.g. before quantising, training or moving the model to another device)."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            _set_submodule(model, name, module.to_linear())
            swapped += 1
    return swapped


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
