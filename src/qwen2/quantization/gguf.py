"""GGUF 4-bit blocks straight into the group-32 int4 layout, the codes unchanged (no float round trip).

Q4_0, Q4_1 and Q4_K give every 32 consecutive weights of a row one affine 4-bit grid, which is exactly what
`Int4WeightOnlyLinear` holds with group_size=32: a code q stands for `(q - 8) * scale + zero`. So

    Q4_0  w = d * (q - 8)            scale = d          zero = 0
    Q4_1  w = d * q + m              scale = d          zero = m + 8 * d
    Q4_K  w = d*sc * q - dmin*mn     scale = d * sc     zero = 8 * d * sc - dmin * mn   (per 32-element sub-block)

(ggml-common.h's block layouts; `loading/dequant.py` unpacks them.) d, m, dmin are float16 and sc, mn 6-bit
integers, so each product is exact in float32. What differs from gguf-py's dequantised values is only the
rounding of scale and zero to the kernel's dtype (for bfloat16, at most 2^-8 of each, relative) and float32
rounding in the sums. Other block types (Q5_0, Q6_K, Q8_0, ...) have no exact int4 form: they go through
dequantise-then-quantise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qwen2.quantization.int4 import pack_nibbles

GROUP = 32  # the sub-block all three formats share
_ROW_ELEMENTS = 1 << 22  # weights unpacked per chunk of rows: bounds the temporaries for a 151936-row head


def _q4_0(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from qwen2.loading.dequant import unpack_q4_0

    d, q = unpack_q4_0(blocks)
    return q, d.view(-1), torch.zeros_like(d.view(-1))


def _q4_1(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from qwen2.loading.dequant import unpack_q4_1

    d, m, q = unpack_q4_1(blocks)
    return q, d.view(-1), (m + 8 * d).view(-1)


def _q4_k(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from qwen2.loading.dequant import unpack_q4_k

    d, dmin, scales, mins, q = unpack_q4_k(blocks)
    scale = d * scales.float()  # (n, 8): one per 32-element sub-block
    zero = 8 * scale - dmin * mins.float()
    return q.reshape(-1, GROUP), scale.view(-1), zero.view(-1)


# ggml type name -> blocks -> (codes (groups, 32) uint8 in 0..15, scale (groups,), zero (groups,)) in float32
_GROUPS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]] = {"Q4_0": _q4_0, "Q4_1": _q4_1,
                                                                          "Q4_K": _q4_k}
DIRECT_TYPES = frozenset(_GROUPS)


def int4_from_gguf(source: object, group_size: int, dtype: torch.dtype) -> dict[str, Tensor] | None:
    """`{"weight": plain packed codes (out, in // 2), "scales_and_zeros": (in // 32, out, 2) in dtype}` for
    a 2-D GGUF tensor of a direct type (see the module docstring), or None when there is no exact mapping.

    `source` is a `loading.gguf.GGUFTensor` (anything with `ggml_type`, `shape` and `blocks(first, count)`).
    """
    ggml_type = getattr(source, "ggml_type", None)
    if group_size != GROUP or ggml_type is None or ggml_type.name not in _GROUPS or len(source.shape) != 2:
        return None
    unpack = _GROUPS[ggml_type.name]
    n, k = source.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scales_and_zeros = torch.empty(k // GROUP, n, 2, dtype=dtype)
    rows = max(1, _ROW_ELEMENTS // k)
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        codes, scale, zero = unpack(source.blocks(lo * k, (hi - lo) * k))
        packed[lo:hi] = pack_nibbles(codes.reshape(hi - lo, k))
        scales_and_zeros[:, lo:hi, 0] = scale.view(hi - lo, k // GROUP).t()
        scales_and_zeros[:, lo:hi, 1] = zero.view(hi - lo, k // GROUP).t()
    return {"weight": packed, "scales_and_zeros": scales_and_zeros}
