"""Speculative decoding's verification forward: the last token and a draft of D tokens in one pass, compiled
when generate()'s decode step is (the issue: "the verification step is a small fixed-size forward: compile it").

Compiled, the rows are padded to `VERIFY_ROWS` (one static shape: the padding rows come after the real ones, so
causal attention keeps them out of the real rows' results, and their cache slots are cropped after), and the
cache length is a dynamic dimension as in the decode step, so one graph serves every round and context length.
8 rows: the int8 VNNI kernel reads each weight once per 8 rows.

Greedy identity: plain greedy picks each token from the one-row decode step's logits. A several-row forward
computes the same sums in another order (a GEMM instead of the step's row reductions, SDPA's blocked attention),
which can flip a near-tie. While compiling, `VerifyRows` makes each row's arithmetic the compiled one-row step's:
bfloat16 linears as `row_linear.rows_matvec` (each output the same reduction as the step's `row_matvec`, the
weight still read once), int8 linears through the VNNI row kernel (per-row arithmetic independent of the row
count), and attention row by row as the step's `_single_query_attention`. Eager, the linears' row kernels (bf16,
int8, int4) already compute each row as they would alone, so attention is split row by row, each as the eager
one-row step calls SDPA. Where those kernels cannot run (no AVX-512 VNNI/BF16, float32 weights) a several-row
product may still round a near-tie differently.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen2.generation.fast import CompiledDecodeStep, DecodeLinears
from qwen2.quantization import kernels
from qwen2.row_linear import rows_linear

VERIFY_ROWS = kernels.ROWS_PER_WEIGHT_PASS  # and int8 layers compile their rows on the VNNI kernel up to it


class VerifyRows(DecodeLinears):
    """`DecodeLinears`, and for a verification: several-row linears (while compiling) and attention computed
    row for row as the one-row decode step computes them (see the module docstring)."""

    def __init__(self, groups: int, cache_slots: int) -> None:
        super().__init__()
        self.groups = groups  # query heads per key/value head
        self.cache_slots = cache_slots  # the static cache's length: the keys the one-row step attends over

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():
            if func is F.linear:
                x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                rows = x.numel() // x.shape[-1]
                if (1 < rows <= VERIFY_ROWS and x.device.type == "cpu" and x.dtype == weight.dtype
                        and (bias is None or bias.dtype == x.dtype)):
                    return rows_linear(x, weight, bias)
        if func is F.scaled_dot_product_attention:
            return self._attention(func, args, kwargs)
        return super().__torch_function__(func, types, args, kwargs)

    def _attention(self, func, args, kwargs) -> Tensor:
        """Each query row as the decode step attends with one query: compiled, `_single_query_attention`;
        eager, SDPA on the query group folded into the length axis over every slot of the static cache (the
        slots not written yet masked), as `Qwen2Attention._sdpa` decodes one row: SDPA rounds differently for
        another key count, even where the extra keys are masked."""
        from qwen2.model import _single_query_attention  # the model imports generation: not at import time

        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        plain = (q.device.type != "cpu" or mask is None or mask.dtype != torch.bool or len(args) > 4
                 or kwargs.get("dropout_p", 0.0) != 0.0 or kwargs.get("is_causal", False)
                 or kwargs.get("enable_gqa", False) or k.shape[1] != q.shape[1]
                 or (torch.compiler.is_compiling() and q.shape[2] > VERIFY_ROWS))
        if plain:
            return func(*args, **kwargs)
        batch, heads, rows, dim = q.shape
        scale = kwargs.get("scale")
        scale = dim ** -0.5 if scale is None else scale
        k, v = k[:, ::self.groups], v[:, ::self.groups]  # one of each key/value head's repeated copies
        if torch.compiler.is_compiling():
            def one_row(packed: Tensor, row_mask: Tensor) -> Tensor:
                return _single_query_attention(packed, k, v, row_mask, scale)
        else:
            written = k.shape[2]
            if written < self.cache_slots:
                k = torch.cat([k, k.new_zeros(*k.shape[:2], self.cache_slots - written, dim)], dim=2)
                v = torch.cat([v, v.new_zeros(*v.shape[:2], self.cache_slots - written, dim)], dim=2)
                mask = torch.cat([mask, mask.new_zeros(*mask.shape[:3], self.cache_slots - written)], dim=3)

            def one_row(packed: Tensor, row_mask: Tensor) -> Tensor:
                return func(packed, k, v, attn_mask=row_mask, scale=scale)
        out = [one_row(q[:, :, t].reshape(batch, heads // self.groups, self.groups, dim),
                       mask[:, :, t:t + 1]).reshape(batch, heads, 1, dim)
               for t in range(rows)]
        return torch.cat(out, dim=2)


def _verify_forward(model: nn.Module, tokens: Tensor, position_ids: Tensor, cache_position: Tensor,
                    attention_mask: Tensor | None, cache: Any) -> Tensor:
    """(rows, V) float32 logits of every row of `tokens` (1, rows), written into `cache` at `cache_position`."""
    config = model.config
    with VerifyRows(config.num_attention_heads // config.num_key_value_heads, cache.get_max_cache_shape()):
        output = model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask,
                       past_key_values=cache, use_cache=True, cache_position=cache_position,
                       logits_to_keep=tokens.shape[1])
    return output.logits[0].float()


# model -> its compiled verification; weak, as generation.fast's registry of compiled decode steps.
_compiled: weakref.WeakKeyDictionary[nn.Module, CompiledDecodeStep] = weakref.WeakKeyDictionary()


class Verifier:
    """Runs verifications for one generate() call: compiled and padded to `VERIFY_ROWS` when `compiled`, else
    eager on the rows as they are."""

    def __init__(self, model: nn.Module, compiled: bool) -> None:
        self.model = model
        self.step = None
        if compiled:
            self.step = _compiled.get(model)
            if self.step is None:
                self.step = _compiled[model] = CompiledDecodeStep(_verify_forward, "verification step")

    @property
    def max_draft(self) -> int | None:
        """The longest draft one compiled verification takes (None: any)."""
        return None if self.step is None else VERIFY_ROWS - 1

    def room(self, position: int, cache: Any) -> int:
        """The longest draft verifiable from cache position `position`: compiled, none where the padded rows
        would not fit in the cache (those last tokens decode plainly, as the compiled step computes them)."""
        if self.step is None:
            return cache.get_max_cache_shape() - position - 1
        return VERIFY_ROWS - 1 if position + VERIFY_ROWS <= cache.get_max_cache_shape() else 0

    def __call__(self, tokens: Tensor, position: int, position_shift: int, mask: Tensor | None,
                 cache: Any) -> Tensor:
        """(rows, V) float32 logits of `tokens` (rows,) placed from cache position `position` on: compiled and
        padded when compiling (`room` leaves the padding space), else eager."""
        rows = tokens.shape[0]
        if self.step is not None:
            padded = torch.cat([tokens, tokens[-1:].expand(VERIFY_ROWS - rows)])
            cache_position = torch.arange(position, position + VERIFY_ROWS, device=tokens.device)
            logits = self.step(self.model, padded[None], (cache_position + position_shift)[None], cache_position,
                               mask, cache)
            return logits[:rows]
        cache_position = torch.arange(position, position + rows, device=tokens.device)
        return _verify_forward(self.model, tokens[None], (cache_position + position_shift)[None], cache_position,
                               mask, cache)
