"""Structured output in the engine: each constrained sequence holds a `qwen2.constrained.Constraint`, and a step
masks the logits of its constrained rows to the tokens their grammars allow.

The masks depend only on the tokens sampled so far, so they are computed while the model's forward runs: the
step hands them to a worker thread (llguidance releases the GIL) before the forward and collects them after it.
All constrained rows of a step share one bitmask and one fill call; a step without constrained rows does
nothing here. A preempted sequence keeps its constraint: recomputation rebuilds its KV cache, not its tokens,
and the constraint is a function of the tokens alone.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Any

import torch

from qwen2.serving.errors import ConstraintError
from qwen2.serving.params import SamplingParams
from qwen2.serving.sequence import Sequence

logger = logging.getLogger(__name__)

# llguidance's bound is on its own work; this is the wall-clock bound on a schema's compilation.
DEFAULT_COMPILE_TIMEOUT = 5.0


def compile_request_constraint(tokenizer: Any, eos_token_ids: set[int], params: SamplingParams,
                               timeout: float = DEFAULT_COMPILE_TIMEOUT) -> Any:
    """The Constraint at the start of `params.structured_outputs` (None without one); ConstraintError (a
    ValueError) naming the problem for an invalid, unsupported or too slow to compile constraint."""
    if params.structured_outputs is None:
        return None
    if tokenizer is None:
        raise ConstraintError("the engine has no tokenizer to compile it with.")
    from qwen2.constrained import compile_constraint

    try:
        return compile_constraint(tokenizer, eos_token_id=sorted(eos_token_ids), timeout=timeout,
                                  **params.structured_outputs.constraint())
    except ValueError as error:
        raise ConstraintError(str(error)) from None


@dataclass
class PendingMasks:
    """The masks of one step's constrained rows, being computed: `rows` index the step's sampled logits."""

    rows: list[int]
    bitmask: torch.Tensor
    future: concurrent.futures.Future

    def apply(self, logits: torch.Tensor) -> None:
        """Wait for the masks and set the logits of every forbidden token of the constrained rows to -inf, in
        place."""
        from qwen2.constrained import apply_bitmask_

        self.future.result()
        for i, row in enumerate(self.rows):
            apply_bitmask_(logits[row:row + 1], self.bitmask[i:i + 1])


class MaskWorker:
    """One thread that computes a step's masks beside the forward (started on first use; it ends with the
    engine, when the pool is collected)."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self, seqs: list[Sequence]) -> PendingMasks | None:
        """Begin the masks of the constrained ones among `seqs` (the rows that sample this step, in order)."""
        rows = [(seq.constraint, row) for row, seq in enumerate(seqs) if seq.constraint is not None]
        if not rows:
            return None
        from qwen2.constrained import fill_bitmask, new_bitmask

        bitmask = new_bitmask(len(rows), rows[0][0].vocab_size)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen2-masks")
        work = [(constraint, i) for i, (constraint, _) in enumerate(rows)]
        return PendingMasks([row for _, row in rows], bitmask, self._pool.submit(fill_bitmask, work, bitmask))


def advance(seq: Sequence, token: int) -> bool:
    """Move a constrained sequence's grammar past its new token; False if the grammar refused it (its mask was
    overridden, e.g. every allowed token had probability 0)."""
    if seq.constraint is None or seq.constraint.advance(token):
        return True
    logger.warning("request %s: token %d is outside its structured_outputs grammar; the sample stops.",
                   seq.request_id, token)
    return False
