"""One sequence's constraint, and the batched mask functions a decode loop calls each step.

A serving engine keeps one `Constraint` per constrained sequence: each step it fills the masks of all of them
together (`fill_bitmask`, llguidance's thread pool, GIL released, so it can overlap the model's forward),
masks the logits (`apply_bitmask`, or `apply_bitmask_` in place), samples, then `advance`s each sequence on its
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qwen2.constrained.engine import executor, ll_tokenizer
from qwen2.constrained.grammar import DEFAULT_COMPILE_TIMEOUT, compile_grammar

# mask byte -> what masking adds to its 8 logits (llguidance's bit order: least significant bit first): a
# forbidden token's bit is 0 and adds -inf, an allowed one's adds 0.
_PENALTY = np.array([-np.inf, 0.0], dtype=np.float32).take(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"))


class Constraint:
    """Where one sequence stands in its grammar. `finished` once the grammar is complete and cannot go on (the
    mask then allows only the end tokens) or after a token it rejected."""

    def __init__(self, matcher: Any, ll_tokenizer: Any) -> None:
        self.matcher = matcher
        self.ll_tokenizer = ll_tokenizer

    @property
    def vocab_size(self) -> int:
        return self.ll_tokenizer.vocab_size

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def failed(self) -> bool:
        """True after a token outside the grammar (the mask was not applied, or another rule overrode it)."""
        return self.matcher.is_error()

    def advance(self, token: int) -> bool:
        """Take the sequence's next token; False if the grammar rejects it. Tokens after the end are ignored."""
        if self.matcher.is_stopped():
            return not self.matcher.is_error()
        return self.matcher.consume_token(int(token))

    def fork(self) -> "Constraint":
        """An independent copy (a beam that splits, a sequence sampled n times)."""
        return Constraint(self.matcher.deep_copy(), self.ll_tokenizer)


def compile_constraint(
    tokenizer: Any,
    *,
    json_schema: dict[str, Any] | str | bool | None = None,
    regex: str | None = None,
    grammar: str | None = None,
    choice: Sequence[str] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    timeout: float = DEFAULT_COMPILE_TIMEOUT,
) -> Constraint:
    """A Constraint at the start of exactly one of: a JSON schema, a regex, a Lark grammar (as llguidance takes
    it) or a list of literal choices. The end tokens default to the tokenizer's eos token. Raises ValueError
    naming the problem for an invalid or too complex constraint."""
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in (eos_token_id or [])]
    table = ll_tokenizer(tokenizer, eos)
    return Constraint(compile_grammar(table, json_schema, regex, grammar, choice, timeout), table)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """(rows, ceil(V / 32)) int32 bitmask on the CPU, where llguidance writes the allowed tokens."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def fill_bitmask(rows: Sequence[tuple[Constraint, int]], bitmask: torch.Tensor) -> None:
    """Write the mask of each (constraint, row) into bitmask[row], all in one parallel call."""
    if len(rows) == 1:  # one sequence: no thread pool, whose spinning workers would take the model's cores
        constraint, row = rows[0]
        constraint.matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)
    elif rows:
        executor().unsafe_compute_mask_ptr([(c.matcher, row) for c, row in rows], bitmask.data_ptr(),
                                           bitmask.shape[1] * 4, bitmask.shape[0])


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """scores (N, V) with the tokens bitmask (N, W) forbids set to -inf (a new tensor). Ids past the grammar's
    vocabulary (a model's padded rows) are forbidden too."""
    masked = scores.detach().cpu().float().numpy().copy()
    _mask(masked, bitmask)
    return torch.from_numpy(masked).to(scores.device, scores.dtype)


def apply_bitmask_(scores: torch.Tensor, bitmask: torch.Tensor) -> None:
    """`apply_bitmask` in place, on float32 CPU scores (the engine's logits)."""
    if scores.dtype != torch.float32 or scores.device.type != "cpu":
        raise ValueError(f"apply_bitmask_ takes float32 CPU scores, got {scores.dtype} on {scores.device}.")
    _mask(scores.numpy(), bitmask)


def _mask(scores: np.ndarray, bitmask: torch.Tensor) -> None:
    """In numpy, single-threaded, a row at a time: each mask byte picks its 8 logits' penalties from a table (one
    gather per byte rather than one per token) and the row adds them (~0.06 ms a row on a 152k vocabulary, 3x
    less than unpacking the bits and gathering per token). torch's element-wise kernels would spread a row over
    its thread pool, whose hand-offs cost more than the work (tens of ms per step when the model's threads share
    the cores)."""
    mask_bytes = bitmask.numpy().view(np.uint8)
    width = min(mask_bytes.shape[1] * 8, scores.shape[1])
    for row, mask in zip(scores, mask_bytes):
        row[:width] += _PENALTY.take(mask, axis=0).reshape(-1)[:width]
        row[width:] = -np.inf
