"""`ConstrainedLogitsProcessor`: a logits processor `(input_ids, scores) -> scores` for generate().

A processor only sees the rows' tokens, and beam search reorders rows between steps, so each row's grammar
state is found by its history: the constraint reached after the tokens generated so far. A row's history
minus its last token is some row's history of the step before (its beam parent, or itself), whose state is
advanced by that token, or forked first when several rows continue it. Rows with the same history share one
state and one mask. Everything before the first call's length is the prompt.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from qwen2.constrained.constraint import Constraint, apply_bitmask, compile_constraint, fill_bitmask, new_bitmask

logger = logging.getLogger(__name__)


class ConstrainedLogitsProcessor:
    """Masks every row's logits to the tokens that keep its output inside the grammar, and allows only the end
    tokens once the grammar is complete. Give exactly one of `json_schema`, `regex`, `grammar` (Lark, as
    llguidance takes it) or `choice`; an invalid one raises ValueError here, before any token is generated.

    The processor remembers where the prompt ends: one generate() call at a time, or call `reset()`.
    """

    def __init__(self, tokenizer: Any, **constraint: Any) -> None:
        """`constraint`: the keyword arguments of `compile_constraint` (json_schema, regex, grammar, choice,
        eos_token_id, timeout)."""
        self._start = compile_constraint(tokenizer, **constraint)
        self.reset()

    def reset(self) -> None:
        """Forget the previous generation: the next call's rows are prompts."""
        self._prompt_length = -1
        self._states: dict[tuple[int, ...], Constraint] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        states = None
        if self._states and length == self._prompt_length + len(next(iter(self._states))) + 1:
            histories = [tuple(row) for row in input_ids[:, self._prompt_length :].tolist()]
            states = self._advance(histories)
        if states is None:  # a new generation (or rows this processor has not seen): they are all prompts
            self._prompt_length, histories = length, [()] * input_ids.shape[0]
            states = {(): self._start.fork()}
        self._states = states
        keys = list(self._states)
        bitmask = new_bitmask(len(keys), self._start.vocab_size)
        fill_bitmask([(self._states[key], i) for i, key in enumerate(keys)], bitmask)
        index = {key: i for i, key in enumerate(keys)}
        masks = bitmask[torch.tensor([index[h] for h in histories])]
        masked = apply_bitmask(scores, masks)
        dead = masked.amax(dim=-1).isneginf()
        if bool(dead.any()):
            # An earlier processor banned every token the grammar allows (min_new_tokens against a grammar that is
            # complete, whose only tokens are the end tokens): the grammar wins, rather than an argmax over -inf
            # picking a token outside it.
            masked[dead] = apply_bitmask(torch.zeros(int(dead.sum()), scores.shape[1]), masks[dead]).to(masked)
        return masked

    def _advance(self, histories: list[tuple[int, ...]]) -> dict[tuple[int, ...], Constraint] | None:
        """The state of each distinct history, from the previous step's states; None if a row has no parent."""
        distinct = list(dict.fromkeys(histories))
        if any(h[:-1] not in self._states for h in distinct):
            return None
        children = Counter(h[:-1] for h in distinct)
        states: dict[tuple[int, ...], Constraint] = {}
        for history in distinct:
            parent = self._states[history[:-1]]
            children[history[:-1]] -= 1
            state = parent.fork() if children[history[:-1]] else parent  # the last child takes the parent itself
            if not state.advance(history[-1]):
                logger.debug("token %d is outside the grammar (a row that stopped for another reason)", history[-1])
            states[history] = state
        return states
