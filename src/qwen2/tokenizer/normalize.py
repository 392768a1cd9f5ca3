"""Normalisation and pre-tokenisation exactly as the `tokenizers` library does them for Qwen2.

`unicodedata` and the `regex` package carry newer Unicode data than `tokenizers` (NFC from Unicode 9.0,
Oniguruma's character classes). They agree on every character older data knows, so the fast path
uses them directly; only text holding a character the old data lacks takes the exact path, found by a
bisect over the (rare) code points of such text.
"""

from __future__ import annotations

import functools
import unicodedata
from bisect import bisect_right

import regex

from qwen2.tokenizer import unicode_tables
from qwen2.tokenizer.byte_level import PRETOKENIZE_REGEX, python_pretokenize_regex


class Spans:
    """Membership test over sorted code-point spans ("41-5A,61" hex form)."""

    def __init__(self, spans: str) -> None:
        self.starts, self.ends = [], []
        for span in spans.split(","):
            low, _, high = span.partition("-")
            self.starts.append(int(low, 16))
            self.ends.append(int(high or low, 16))

    def __contains__(self, code_point: int) -> bool:
        i = bisect_right(self.starts, code_point) - 1
        return i >= 0 and code_point <= self.ends[i]

    def any_in(self, text: str) -> bool:
        return any(ord(ch) in self for ch in set(text) if ord(ch) >= 0x80)


NFC_INERT = Spans(unicode_tables.NFC_INERT)
UNASSIGNED = Spans(unicode_tables.UNASSIGNED)


def nfc(text: str) -> str:
    """NFC as `tokenizers` computes it: characters its data lacks stay where they are and cut the
    text, since to it they are unassigned starters that nothing reorders or composes with."""
    if text.isascii():
        return text
    if not NFC_INERT.any_in(text):
        return unicodedata.normalize("NFC", text)
    parts, start = [], 0
    for index, ch in enumerate(text):
        if ord(ch) >= 0x80 and ord(ch) in NFC_INERT:
            parts += [unicodedata.normalize("NFC", text[start:index]), ch]
            start = index + 1
    parts.append(unicodedata.normalize("NFC", text[start:]))
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _exact_split() -> regex.Pattern:
    return regex.compile(python_pretokenize_regex())  # explicit classes: slower, used only when needed


_fast_split = regex.compile(PRETOKENIZE_REGEX).findall


def pretokenize(text: str) -> list[str]:
    """Qwen2's regex split of already-normalised text."""
    if text.isascii() or not UNASSIGNED.any_in(text):
        return _fast_split(text)
    return _exact_split().findall(text)


def nfc_aligned(text: str) -> tuple[str, list[int] | None]:
    """NFC text, and for each of its characters the index of the original character `tokenizers`
    aligns it with (None when NFC changes nothing).

    `tokenizers` replays the normaliser's output as (character, change) pairs: a character with
    change <= 0 takes the next original character's place and drops -change more of them (a composed
    "é" from "e" + U+0301 aligns with the "e"; the accent is gone), one with change > 0 is inserted
    and aligns with the original character before it. Decomposition marks every character after the
    first as inserted; composition folds the absorbed character's change into its starter, minus one.
    """
    normalized = nfc(text)
    if normalized == text:
        return text, None
    chars: list[str] = []
    origin: list[int] = []
    start = 0
    for index in range(len(text) + 1):
        if index < len(text) and not (ord(text[index]) >= 0x80 and ord(text[index]) in NFC_INERT):
            continue
        _replay(_changes(text[start:index]), start, chars, origin)
        if index < len(text):  # a character the old Unicode data lacks stands alone
            chars.append(text[index])
            origin.append(index)
        start = index + 1
    return "".join(chars), origin


def _changes(segment: str) -> list[tuple[str, int]]:
    """NFC of `segment` as (character, change) pairs: decompose, reorder marks, recompose."""
    decomposed: list[tuple[str, int]] = []
    for ch in segment:
        parts = unicodedata.normalize("NFD", ch)
        decomposed += [(c, 0 if k == 0 else 1) for k, c in enumerate(parts)]
    # Canonical ordering: stable sort of each run of combining marks by combining class.
    ordered: list[tuple[str, int]] = []
    run: list[tuple[str, int]] = []
    for item in decomposed + [("", 0)]:
        if item[0] and unicodedata.combining(item[0]):
            run.append(item)
            continue
        ordered += sorted(run, key=lambda pair: unicodedata.combining(pair[0]))
        run = []
        if item[0]:
            ordered.append(item)
    composed: list[tuple[str, int]] = []
    starter: int | None = None
    last_class: int | None = None  # combining class of the last character kept since the starter
    for ch, change in ordered:
        klass = unicodedata.combining(ch)
        if starter is not None and (last_class is None or (last_class != 0 and last_class < klass)):
            pair = unicodedata.normalize("NFC", composed[starter][0] + ch)
            if len(pair) == 1:
                composed[starter] = (pair, composed[starter][1] + change - 1)
                continue
        if klass == 0:
            starter, last_class = len(composed), None
        else:
            last_class = klass
        composed.append((ch, change))
    return composed


def _replay(pairs: list[tuple[str, int]], offset: int, chars: list[str], origin: list[int]) -> None:
    for ch, change in pairs:
        if change > 0:
            origin.append(max(offset - 1, 0))
        else:
            origin.append(offset)
            offset += 1 - change
        chars.append(ch)
