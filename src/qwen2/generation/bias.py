"""Logits processors that steer which tokens come next: sequence biases and banned words, a per-row allowed-token
function, and an end-of-sequence bonus that grows with the length.

Semantics of transformers 5.24's `SequenceBiasLogitsProcessor`, `NoBadWordsLogitsProcessor`,
`PrefixConstrainedLogitsProcessor` and `ExponentialDecayLengthPenalty`; `build_logits_processors` (logits.py)
puts them where the reference's order has them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def sequence_bias_dict(sequence_bias: Any) -> dict[tuple[int, ...], float]:
    """`{(ids...): bias}` from either accepted form: that dict, or `[[ids, bias], ...]` (JSON-friendly)."""
    pairs = sequence_bias.items() if isinstance(sequence_bias, dict) else sequence_bias
    if not isinstance(sequence_bias, (dict, list)) or not sequence_bias:
        raise ValueError(f"`sequence_bias` has to be a non-empty dict or list of [token ids, bias] pairs, "
                         f"but is {sequence_bias!r}.")
    result = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not _token_ids(pair[0]) \
                or not isinstance(pair[1], float):
            raise ValueError(f"Each `sequence_bias` entry has to pair a non-empty sequence of non-negative token "
                             f"ids with a float bias, but one is {pair!r}.")
        result[tuple(pair[0])] = pair[1]
    return result


class SequenceBias:
    """Add `bias` to the logit of a sequence's last token whenever the row ends with the rest of it
    (a one-token sequence: always). -inf bans it."""

    def __init__(self, biases: dict[tuple[int, ...], float]) -> None:
        self.biases = biases
        self._checked_vocab: int | None = None

    def _check(self, vocab_size: int) -> None:
        outside = sorted({t for sequence in self.biases for t in sequence if t >= vocab_size})
        if outside:
            raise ValueError(f"The model vocabulary size is {vocab_size}, but `sequence_bias`/`bad_words_ids` name "
                             f"token ids outside it: {outside}")
        self._checked_vocab = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._checked_vocab != scores.shape[-1]:
            self._check(scores.shape[-1])
        bias = torch.zeros_like(scores)
        length = input_ids.shape[1]
        for sequence, value in self.biases.items():
            *prefix, last = sequence
            if len(prefix) > length:
                continue
            if prefix:
                tail = input_ids[:, length - len(prefix):]
                ends_with_prefix = (tail == torch.tensor(prefix, device=input_ids.device)).all(dim=-1)
                bias[:, last] += torch.where(ends_with_prefix, value, 0.0).to(bias.dtype)
            else:
                bias[:, last] += value
        return scores + bias


def bad_words(bad_words_ids: Any, eos_token_id: torch.Tensor | None) -> SequenceBias:
    """Ban each listed sequence (-inf on its last token after the rest); a lone eos id is never banned."""
    if not isinstance(bad_words_ids, list) or not bad_words_ids or not all(_token_ids(w) for w in bad_words_ids):
        raise ValueError(f"`bad_words_ids` has to be a non-empty list of non-empty lists of non-negative token ids, "
                         f"but is {bad_words_ids!r}.")
    eos = set() if eos_token_id is None else {int(t) for t in eos_token_id.reshape(-1)}
    kept = [w for w in bad_words_ids if not (len(w) == 1 and w[0] in eos)]
    return SequenceBias({tuple(w): -math.inf for w in kept})


class PrefixAllowedTokens:
    """Only the tokens `prefix_allowed_tokens_fn(batch_id, row_ids)` returns may come next. A prompt whose
    allowed tokens all score -inf in every one of its rows gets them at score 0, so the constraint still holds."""

    def __init__(self, allowed: Callable[[int, torch.Tensor], Sequence[int]], rows_per_prompt: int) -> None:
        self.allowed = allowed
        self.rows_per_prompt = rows_per_prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        penalty = torch.full_like(scores, -math.inf)
        for row in range(input_ids.shape[0]):
            batch_id = row // self.rows_per_prompt
            tokens = list(self.allowed(batch_id, input_ids[row]))
            if not tokens:
                raise ValueError(f"`prefix_allowed_tokens_fn` returned no tokens for batch id {batch_id}: the "
                                 "constraint cannot be met.")
            penalty[row, tokens] = 0.0
        constrained = scores + penalty
        stuck = constrained.amax(dim=-1).isneginf().view(-1, self.rows_per_prompt).all(dim=-1)
        stuck = stuck.repeat_interleave(self.rows_per_prompt)[:, None]
        return torch.where(stuck, penalty, constrained)


class ExponentialDecayLengthPenalty:
    """After `start` new tokens, raise the eos logits by |logit| * (factor ** n - 1), n tokens past the start."""

    def __init__(self, penalty: Any, eos_token_id: torch.Tensor | None, prompt_length: int) -> None:
        if not isinstance(penalty, (list, tuple)) or len(penalty) != 2 or not isinstance(penalty[0], int) \
                or not isinstance(penalty[1], (int, float)):
            raise ValueError(f"`exponential_decay_length_penalty` has to be (start_index, decay_factor), "
                             f"but is {penalty!r}.")
        if eos_token_id is None:
            raise ValueError("`exponential_decay_length_penalty` needs an `eos_token_id` to favour.")
        self.start = penalty[0] + prompt_length
        self.factor = float(penalty[1])
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        past = input_ids.shape[-1] - self.start
        if past <= 0:
            return scores
        eos = self.eos_token_id.to(scores.device)
        eos_scores = scores[:, eos]
        bonus = eos_scores.abs() * (self.factor**past - 1)
        bonus = torch.where(torch.isfinite(eos_scores), bonus, 0.0)
        out = scores.clone()
        out[:, eos] = eos_scores + bonus
        return out
