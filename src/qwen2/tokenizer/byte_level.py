"""Byte-level BPE constants shared by the pure-Python and `tokenizers` paths (GPT-2 / Qwen2)."""

from __future__ import annotations

from qwen2.tokenizer import unicode_tables

# Qwen2's pre-tokenisation split: contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, and whitespace that leaves one space for the next word.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def char_class(spans: str) -> str:
    """Character-class body (no brackets) for "41-5A,61" style hex spans."""
    parts = []
    for span in spans.split(","):
        low, _, high = span.partition("-")
        parts.append(f"\\U{int(low, 16):08X}" + (f"-\\U{int(high, 16):08X}" if high else ""))
    return "".join(parts)


def python_pretokenize_regex() -> str:
    """PRETOKENIZE_REGEX for the `regex` package, with `tokenizers`' own letter, number and space classes
    spelled out: the `regex` package knows newer Unicode, and would split newly assigned letters differently."""
    letters, numbers, spaces = (char_class(unicode_tables.LETTERS), char_class(unicode_tables.NUMBERS),
                                char_class(unicode_tables.SPACES))
    return (
        rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{letters}{numbers}]?[{letters}]+|[{numbers}]"
        rf"| ?[^{spaces}{letters}{numbers}]+[\r\n]*|[{spaces}]*[\r\n]+|[{spaces}]+(?![^{spaces}])|[{spaces}]+"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves,
    the rest to code points from 256 up, so every byte sequence is spelled in visible characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {ch: b for b, ch in BYTE_TO_UNICODE.items()}
