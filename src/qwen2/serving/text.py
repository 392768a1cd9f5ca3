"""A sample's text as it grows, and its stop strings.

The text is the tokenizer's decoding of all generated ids, redone each step (decoding ids one at a time would
split multi-byte characters). What a caller sees only ever grows: while running, a trailing incomplete
character and any tail that could still become a stop string are held back; a matched stop string and
everything after it are cut.
"""

from __future__ import annotations

from typing import Any

from qwen2.serving.params import SamplingParams


class StopChecker:
    def __init__(self, tokenizer: Any, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.stops = params.stop
        self.skip_special_tokens = params.skip_special_tokens
        self.matched: str | None = None
        self._text = ""
        self._searched = 0  # text before this offset holds no stop string
        self._emitted = ""

    def update(self, output_ids: list[int]) -> None:
        if self.tokenizer is None or self.matched is not None:
            return
        self._text = self.tokenizer.decode(output_ids, skip_special_tokens=self.skip_special_tokens)
        if not self.stops:
            return
        longest = max(len(s) for s in self.stops)
        start = max(0, self._searched - longest + 1)
        found = [(self._text.find(s, start), s) for s in self.stops]
        found = [(at, s) for at, s in found if at >= 0]
        if found:
            at, stop = min(found)
            self._text = self._text[:at]
            self.matched = stop
        self._searched = len(self._text)

    def text(self, final: bool) -> str:
        """What the caller may see now (everything once the sample is finished)."""
        text = self._text
        if not final and self.matched is None:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self._held(text)]
        if text.startswith(self._emitted):
            self._emitted = text
        return self._emitted if not final else text

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        for size in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0
