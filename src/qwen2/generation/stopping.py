"""Stopping criteria: callables `(input_ids, scores) -> (B,) bool` saying which rows are done.

Semantics of transformers' `generation/stopping_criteria.py`: max length, max time, end-of-sequence ids,
and stop strings. A stop string stops a row when it occurs in the row's text *ending inside the last token*
(so it fires exactly once, on the token that completes it, even when it spans tokens or the token
overhangs it). Matching is done on the tokens' raw bytes, like the reference for byte-level BPE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch

StoppingCriterion = Callable[[torch.Tensor, Any], torch.Tensor]


class MaxLength:
    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def __call__(self, input_ids: torch.Tensor, scores: Any = None) -> torch.Tensor:
        done = input_ids.shape[1] >= self.max_length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class MaxTime:
    def __init__(self, max_time: float, start: float | None = None) -> None:
        self.max_time = max_time
        self.start = time.time() if start is None else start

    def __call__(self, input_ids: torch.Tensor, scores: Any = None) -> torch.Tensor:
        done = time.time() - self.start > self.max_time
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class EosToken:
    def __init__(self, eos_token_id: torch.Tensor) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: Any = None) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.eos_token_id.to(input_ids.device))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for the 256 byte values, reversed (char -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class StopStrings:
    """Stop a row when one of `stop_strings` is completed by its last token."""

    def __init__(self, stop_strings: str | Sequence[str], tokenizer: Any) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"`stop_strings` must be a non-empty string or list of them, got {stop_strings!r}.")
        if tokenizer is None:
            raise ValueError(
                "`stop_strings` needs the tokenizer to read the generated text: pass `tokenizer=` to generate()."
            )
        self.tokenizer = tokenizer
        self.stops = [s.encode("utf-8") for s in stop_strings]
        self.longest = max(len(s) for s in self.stops)
        self._bytes: dict[int, bytes] = {}

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = _token_to_bytes(self.tokenizer, token_id)
            self._bytes[token_id] = cached
        return cached

    def row_done(self, tail: list[int]) -> bool:
        """`tail`: the row's last tokens (enough of them to hold the longest stop string before the last one)."""
        pieces = [self.token_bytes(t) for t in tail]
        text = b"".join(pieces)
        last_start = len(text) - len(pieces[-1])  # a match must end after this offset
        return any(text.find(stop, max(0, last_start - len(stop) + 1)) != -1 for stop in self.stops)

    def __call__(self, input_ids: torch.Tensor, scores: Any = None) -> torch.Tensor:
        # Every earlier token holds at least one byte, so `longest` of them cover any match's start.
        rows = input_ids[:, -(self.longest + 1) :].tolist()
        return torch.tensor([self.row_done(row) for row in rows], dtype=torch.bool, device=input_ids.device)


def _token_to_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes a token stands for: byte-level BPE tokens map char-by-char, others go through decode()."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    token = convert(token_id) if convert is not None else None
    decoder = _byte_decoder()
    if isinstance(token, str) and token and all(char in decoder for char in token):
        return bytes(decoder[char] for char in token)
    return tokenizer.decode([token_id]).encode("utf-8")


def any_done(criteria: Sequence[StoppingCriterion], input_ids: torch.Tensor, scores: Any = None) -> torch.Tensor:
    """(B,) bool: rows that any criterion marks as finished."""
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for criterion in criteria:
        done = done | criterion(input_ids, scores).to(done.device)
    return done
