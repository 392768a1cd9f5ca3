"""Token-to-text alignment: `Encoding` (ids with their offsets, words and sequences), and the
truncation with overflow and stride, pair merging and padding `tokenizers` applies to it.

Reference: `tokenizers`' `Encoding` (encoding.rs) and `truncate_encodings` / `pad_encodings`
(utils/truncation.rs, utils/padding.rs), as transformers' tokenizers-backed Qwen2Tokenizer uses them.
Both of our tokenizers build `Encoding`s (the fast one from `tokenizers`' own, the slow one in pure
Python) and share everything here, so `return_offsets_mapping`, `return_overflowing_tokens` and
`BatchEncoding.word_ids()` / `char_to_token()` / ... behave the same in both.
"""

from __future__ import annotations

from typing import NamedTuple

from qwen2.tokenizer.padding import pair_lengths

Offset = tuple[int, int]


class CharSpan(NamedTuple):
    """Characters [start, end) of the original text."""

    start: int
    end: int


class TokenSpan(NamedTuple):
    """Tokens [start, end) of an encoding."""

    start: int
    end: int


class Encoding:
    """One encoded sequence (or pair), with the API of `tokenizers.Encoding`.

    Offsets are character offsets into the text each token came from (for a pair, into its own text);
    `word_ids` number the pre-tokenizer's pieces (an added token is one piece); `sequence_ids` say which
    text of a pair a token came from, None for padding.
    """

    __slots__ = ("ids", "type_ids", "tokens", "offsets", "word_ids", "sequence_ids", "attention_mask",
                 "special_tokens_mask", "overflowing", "sequence_ranges")
    _PER_TOKEN = __slots__[:-2]

    def __init__(self, ids: list[int], tokens: list[str], offsets: list[Offset], word_ids: list[int | None],
                 sequence_id: int = 0) -> None:
        self.ids = list(ids)
        self.tokens = list(tokens)
        self.offsets = [tuple(o) for o in offsets]
        self.word_ids = list(word_ids)
        self.sequence_ids: list[int | None] = [sequence_id] * len(ids)
        self.type_ids = [sequence_id] * len(ids)
        self.attention_mask = [1] * len(ids)
        self.special_tokens_mask = [0] * len(ids)
        self.overflowing: list[Encoding] = []
        self.sequence_ranges: dict[int, tuple[int, int]] = {}  # a pair's texts: {0: (start, end), 1: ...}

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Encoding(num_tokens={len(self.ids)}, overflowing={len(self.overflowing)})"

    @property
    def words(self) -> list[int | None]:
        return self.word_ids

    @property
    def n_sequences(self) -> int:
        return len(self.sequence_ranges) or 1

    def _slice(self, start: int, stop: int) -> "Encoding":
        part = Encoding.__new__(Encoding)
        for name in Encoding._PER_TOKEN:
            setattr(part, name, getattr(self, name)[start:stop])
        part.overflowing, part.sequence_ranges = [], {}
        return part

    def _concat(self, other: "Encoding") -> "Encoding":
        joined = Encoding.__new__(Encoding)
        for name in Encoding._PER_TOKEN:
            setattr(joined, name, getattr(self, name) + getattr(other, name))
        joined.overflowing = []
        joined.sequence_ranges = {0: (0, len(self)), 1: (len(self), len(self) + len(other))}
        return joined

    def _sequence_range(self, sequence_index: int) -> range:
        # As in `tokenizers`, a sequence the encoding does not know means the whole encoding.
        return range(*self.sequence_ranges.get(sequence_index, (0, len(self.ids))))

    # ---- the alignment queries -------------------------------------------------------------------
    def token_to_sequence(self, token_index: int) -> int | None:
        return self.sequence_ids[token_index] if 0 <= token_index < len(self.ids) else None

    def token_to_word(self, token_index: int) -> int | None:
        return self.word_ids[token_index] if 0 <= token_index < len(self.ids) else None

    def token_to_chars(self, token_index: int) -> Offset | None:
        if self.token_to_sequence(token_index) is None:
            return None
        return self.offsets[token_index]

    def char_to_token(self, char_pos: int, sequence_index: int = 0) -> int | None:
        for i in self._sequence_range(sequence_index):
            start, end = self.offsets[i]
            if start <= char_pos < end:
                return i
        return None

    def char_to_word(self, char_pos: int, sequence_index: int = 0) -> int | None:
        token = self.char_to_token(char_pos, sequence_index)
        return None if token is None else self.word_ids[token]

    def word_to_tokens(self, word_index: int, sequence_index: int = 0) -> Offset | None:
        found = [i for i in self._sequence_range(sequence_index) if self.word_ids[i] == word_index]
        return (found[0], found[-1] + 1) if found else None

    def word_to_chars(self, word_index: int, sequence_index: int = 0) -> Offset | None:
        span = self.word_to_tokens(word_index, sequence_index)
        return None if span is None else (self.offsets[span[0]][0], self.offsets[span[1] - 1][1])

    # ---- truncation and padding ------------------------------------------------------------------
    def truncate(self, max_length: int, stride: int, side: str) -> None:
        """Keep `max_length` tokens; the rest become `overflowing` windows that repeat `stride` tokens
        of their neighbour, walking away from the kept side."""
        n = len(self.ids)
        if max_length >= n:
            return
        if max_length == 0:
            whole = self._slice(0, n)
            self.__init__([], [], [], [])
            self.overflowing = [whole]
            return
        if stride >= max_length:
            raise ValueError(
                f"stride={stride} must be smaller than the length each piece is truncated to ({max_length})"
            )
        step = max_length - stride
        windows: list[tuple[int, int]] = []
        if side == "right":
            for start in range(0, n, step):
                windows.append((start, min(start + max_length, n)))
                if windows[-1][1] == n:
                    break
        else:
            for stop in range(n, 0, -step):
                windows.append((max(stop - max_length, 0), stop))
                if windows[-1][0] == 0:
                    break
        parts = [self._slice(start, stop) for start, stop in windows]
        for name in Encoding._PER_TOKEN:
            setattr(self, name, getattr(parts[0], name))
        self.overflowing, self.sequence_ranges = parts[1:], {}

    def pad(self, length: int, side: str, pad_id: int, pad_token: str, pad_type_id: int) -> None:
        """Pad to `length` tokens (this encoding and its overflowing windows)."""
        for window in self.overflowing:
            window.pad(length, side, pad_id, pad_token, pad_type_id)
        gap = length - len(self.ids)
        if gap <= 0:
            return
        fills = {"ids": pad_id, "type_ids": pad_type_id, "tokens": pad_token, "offsets": (0, 0), "word_ids": None,
                 "sequence_ids": None, "attention_mask": 0, "special_tokens_mask": 1}
        for name, fill in fills.items():
            values = getattr(self, name)
            setattr(self, name, values + [fill] * gap if side == "right" else [fill] * gap + values)
        if side == "left":
            self.sequence_ranges = {k: (start + gap, end + gap) for k, (start, end) in self.sequence_ranges.items()}


def truncate_and_merge(
    first: Encoding, second: Encoding | None, strategy: str, max_length: int | None, stride: int, side: str
) -> Encoding:
    """One sequence or pair cut to `max_length` tokens, as `tokenizers` does: each text is cut into
    windows, and a pair's overflowing rows are every other combination of their windows."""
    if strategy != "do_not_truncate" and max_length is not None:
        if max_length < 0:
            raise ValueError(f"max_length={max_length} must be >= 0")
        if second is None:
            if strategy == "only_second":
                raise ValueError("truncation='only_second' needs a second sequence (text_pair)")
            first.truncate(max_length, stride, side)
        elif len(first) + len(second) > max_length:
            n_first, n_second = pair_lengths(len(first), len(second), strategy, max_length)
            first.truncate(n_first, stride, side)
            second.truncate(n_second, stride, side)
    if second is None:
        return first
    merged = first._concat(second)
    # Every window of the first text with the second, then the first text with the second's windows.
    for window in first.overflowing:
        merged.overflowing.append(window._concat(second))
        merged.overflowing += [window._concat(other) for other in second.overflowing]
    merged.overflowing += [first._concat(other) for other in second.overflowing]
    return merged
