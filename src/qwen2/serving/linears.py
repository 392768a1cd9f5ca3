"""The runner's linear calls: quantised and other modules are called as they are; plain float `nn.Linear`
weights on the CPU are multiplied through a private oneDNN-packed copy (qwen2.packed_linear's layout, ~2x
plain `F.linear` at a few rows in bfloat16) that the runner keeps beside the model, never in it, and rebuilds
when the weight changes (another tensor or an in-place update)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qwen2.packed_linear import _pack, can_pack


class LinearCalls:
    def __init__(self, pack_weights: bool = True) -> None:
        self.pack_weights = pack_weights
        self._packed: dict[int, tuple[Tensor, tuple, Tensor]] = {}  # id(module) -> (weight, version key, packed)

    def __call__(self, module: nn.Module, x: Tensor) -> Tensor:
        if not (self.pack_weights and type(module) is nn.Linear and x.dtype == module.weight.dtype
                and can_pack(module.weight)):
            return module(x)
        packed = self._packed_weight(module)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def _packed_weight(self, module: nn.Linear) -> Tensor:
        weight = module.weight
        version = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        entry = self._packed.get(id(module))
        if entry is None or entry[0] is not weight or entry[1] != version:
            entry = (weight, version, _pack(weight))
            self._packed[id(module)] = entry
        return entry[2]
