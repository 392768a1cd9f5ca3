"""Added tokens: strings matched whole in the text before BPE runs (`<|im_end|>`, `<tool_call>`, ...).

`AddedToken` mirrors `tokenizers.AddedToken` (same fields and defaults) so the pure-Python tokenizer
needs no compiled dependency; `AddedTokenSplitter` finds them in text the way `tokenizers`'
AddedVocabulary does: leftmost-longest, tokens with `normalized=False` matched on the raw text and
the others on the NFC-normalised text, with `lstrip`/`rstrip` eating neighbouring whitespace.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import regex


class AddedToken:
    """A token matched whole in the input. `normalized` defaults to `not special`, as in `tokenizers`."""

    __slots__ = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")

    def __init__(
        self,
        content: str,
        single_word: bool = False,
        lstrip: bool = False,
        rstrip: bool = False,
        normalized: bool | None = None,
        special: bool = False,
    ) -> None:
        if not isinstance(content, str) or not content:
            raise ValueError(f"an added token needs a non-empty string, got {content!r}")
        self.content = content
        self.single_word = bool(single_word)
        self.lstrip = bool(lstrip)
        self.rstrip = bool(rstrip)
        self.special = bool(special)
        self.normalized = (not self.special) if normalized is None else bool(normalized)

    @classmethod
    def coerce(cls, token: Any, special: bool | None = None) -> "AddedToken":
        """Accept a str, our AddedToken, a `tokenizers.AddedToken` or its dict form."""
        if isinstance(token, str):
            return cls(token, special=bool(special))
        if isinstance(token, dict):
            fields = {k: token[k] for k in cls.__slots__ if k in token}
            return cls(**fields)
        if hasattr(token, "content"):
            return cls(
                token.content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                normalized=token.normalized, special=token.special if special is None else (token.special or special),
            )
        raise TypeError(f"expected a str or AddedToken, got {type(token).__name__}: {token!r}")

    def to_dict(self) -> dict[str, Any]:
        """The `added_tokens_decoder` entry transformers writes in tokenizer_config.json."""
        return {
            "content": self.content, "lstrip": self.lstrip, "normalized": self.normalized,
            "rstrip": self.rstrip, "single_word": self.single_word, "special": self.special,
        }

    def __str__(self) -> str:
        return self.content

    def __repr__(self) -> str:
        return (
            f'AddedToken("{self.content}", rstrip={self.rstrip}, lstrip={self.lstrip}, '
            f"single_word={self.single_word}, normalized={self.normalized}, special={self.special})"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AddedToken):
            return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.content)


def _token_pattern(token: AddedToken) -> str:
    # The token's own text is the only capture group, so `lastindex` names the token that matched.
    body = f"({regex.escape(token.content)})"
    if token.single_word:
        body = rf"(?<!\w){body}(?!\w)"
    if token.lstrip:
        body = rf"\s*{body}"
    if token.rstrip:
        body = rf"{body}\s*"
    return body


def _alternation(tokens: list[AddedToken]) -> regex.Pattern | None:
    if not tokens:
        return None
    # Longest first makes the leftmost match also the longest one, as the Aho-Corasick matcher does.
    ordered = sorted(tokens, key=lambda t: len(t.content), reverse=True)
    return regex.compile("|".join(_token_pattern(t) for t in ordered))


class AddedTokenSplitter:
    """Cut text into plain runs and added-token ids; rebuilt whenever the added vocabulary changes."""

    def __init__(self, tokens: Iterable[tuple[int, AddedToken]]) -> None:
        self._ids: dict[str, int] = {}
        raw, normalized = {True: [], False: []}, {True: [], False: []}
        for token_id, token in tokens:
            self._ids[token.content] = token_id
            (normalized if token.normalized else raw)[token.special].append(token)
        # Index [split_special_tokens]: when specials are split, only non-special tokens stay whole.
        self._raw = {False: _alternation(raw[True] + raw[False]), True: _alternation(raw[False])}
        self._normalized = {
            False: _alternation(normalized[True] + normalized[False]), True: _alternation(normalized[False])
        }

    def split_raw(self, text: str, split_special_tokens: bool) -> list[str | int]:
        """Pieces of `text`: strings to normalise and BPE, ints for added tokens matched on raw text."""
        return _split(self._raw[split_special_tokens], self._ids, text)

    def split_normalized(self, text: str, split_special_tokens: bool) -> list[str | int]:
        """Same, for tokens with `normalized=True`, applied after NFC."""
        return _split(self._normalized[split_special_tokens], self._ids, text)

    def spans_raw(self, text: str, split_special_tokens: bool) -> list[tuple[int, int, int | None]]:
        """`split_raw` as (start, end, added token id or None for plain text) character spans."""
        return _spans(self._raw[split_special_tokens], self._ids, text)

    def spans_normalized(self, text: str, split_special_tokens: bool) -> list[tuple[int, int, int | None]]:
        return _spans(self._normalized[split_special_tokens], self._ids, text)


def _spans(pattern: regex.Pattern | None, ids: dict[str, int], text: str) -> list[tuple[int, int, int | None]]:
    if pattern is None or not text:
        return [(0, len(text), None)] if text else []
    spans: list[tuple[int, int, int | None]] = []
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            spans.append((start, match.start(), None))
        spans.append((match.start(), match.end(), ids[match.group(match.lastindex)]))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text), None))
    return spans


def _split(pattern: regex.Pattern | None, ids: dict[str, int], text: str) -> list[str | int]:
    if pattern is None:
        return [text] if text else []
    return [text[start:end] if index is None else index for start, end, index in _spans(pattern, ids, text)]
