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
