"""Padding and truncation rules, as transformers resolves them and `tokenizers` applies them.

Pure functions over lists of ids, shared by both tokenizers so their outputs cannot drift apart.
"""

from __future__ import annotations

from typing import Any

LARGE_INTEGER = int(1e20)  # model_max_length above this means "no limit" (transformers' convention)
VERY_LARGE_INTEGER = int(1e30)
PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second", "do_not_truncate")


def _strategy_name(value: Any) -> Any:
    return getattr(value, "value", value)  # transformers' PaddingStrategy / TruncationStrategy enums


def resolve_strategies(
    padding: Any,
    truncation: Any,
    max_length: int | None,
    pad_to_multiple_of: int | None,
    model_max_length: int,
    has_pad_token: bool,
) -> tuple[str, str, int | None]:
    """(padding strategy, truncation strategy, max_length) from the user's arguments."""
    padding, truncation = _strategy_name(padding), _strategy_name(truncation)
    if max_length is not None and padding is False and truncation is None:
        truncation = "longest_first"  # a bare max_length means "truncate to it"
    if padding is True:
        padding = "longest"
    elif padding is False or padding is None:
        padding = "do_not_pad"
    elif padding not in PADDING_STRATEGIES:
        raise ValueError(f"padding={padding!r}; expected True, False or one of {PADDING_STRATEGIES}")
    if truncation is True:
        truncation = "longest_first"
    elif truncation is False or truncation is None:
        truncation = "do_not_truncate"
    elif truncation not in TRUNCATION_STRATEGIES:
        raise ValueError(f"truncation={truncation!r}; expected True, False or one of {TRUNCATION_STRATEGIES}")
    if max_length is None:
        no_limit = model_max_length > LARGE_INTEGER
        if padding == "max_length":
            if no_limit:
                padding = "do_not_pad"
            else:
                max_length = model_max_length
        if truncation != "do_not_truncate":
            if no_limit:
                truncation = "do_not_truncate"
            else:
                max_length = model_max_length
    if padding != "do_not_pad" and not has_pad_token:
        raise ValueError(
            "Asking to pad but the tokenizer has no pad_token: set one, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`, or add one with "
            "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`"
        )
    if (
        truncation != "do_not_truncate" and padding != "do_not_pad" and pad_to_multiple_of
        and max_length is not None and max_length % pad_to_multiple_of
    ):
        raise ValueError(
            f"truncation length ({max_length}) is not a multiple of pad_to_multiple_of ({pad_to_multiple_of})"
        )
    return padding, truncation, max_length


def _cut(ids: list[int], length: int, side: str) -> list[int]:
    if len(ids) <= length:
        return ids
    return ids[:length] if side == "right" else ids[len(ids) - length:]


def truncate(
    first: list[int], second: list[int] | None, strategy: str, max_length: int | None, side: str
) -> tuple[list[int], list[int] | None]:
    """Cut a sequence (or pair) to `max_length` tokens in total, with `tokenizers`' pair rules."""
    if strategy == "do_not_truncate" or max_length is None:
        return first, second
    if max_length < 0:
        raise ValueError(f"max_length={max_length} must be >= 0")
    if second is None:
        if strategy == "only_second":
            raise ValueError("truncation='only_second' needs a second sequence (text_pair)")
        return _cut(first, max_length, side), None
    if len(first) + len(second) <= max_length:
        return first, second
    n_first, n_second = pair_lengths(len(first), len(second), strategy, max_length)
    return _cut(first, n_first, side), _cut(second, n_second, side)


def pair_lengths(n_first: int, n_second: int, strategy: str, max_length: int) -> tuple[int, int]:
    """How many tokens of each text of a pair longer than `max_length` are kept."""
    if strategy == "longest_first":
        n1, n2 = n_first, n_second
        swapped = n1 > n2
        if swapped:
            n1, n2 = n2, n1
        n2 = n1 if n1 > max_length else max(n1, max_length - n1)
        if n1 + n2 > max_length:
            n1 = max_length // 2
            n2 = n1 + max_length % 2
        return (n2, n1) if swapped else (n1, n2)
    excess = n_first + n_second - max_length
    if strategy == "only_first":
        if excess >= n_first:  # `tokenizers` refuses to cut a text to nothing
            raise ValueError(
                f"truncation='only_first' cannot reach max_length={max_length}: the second sequence alone "
                f"has {n_second} tokens"
            )
        return n_first - excess, n_second
    if excess >= n_second:
        raise ValueError(
            f"truncation='only_second' cannot reach max_length={max_length}: the first sequence alone "
            f"has {n_first} tokens"
        )
    return n_first, n_second - excess


def pad_length(lengths: list[int], strategy: str, max_length: int | None, multiple: int | None) -> int | None:
    """The length every row is padded to, or None for no padding."""
    if strategy == "do_not_pad" or not lengths:
        return None
    target = max(lengths) if strategy == "longest" else max_length
    if target is None:
        return None
    if multiple and target % multiple:
        target += multiple - target % multiple
    return target


def pad_rows(
    rows: dict[str, list[list[int]]], target: int, side: str, pad_values: dict[str, int]
) -> dict[str, list[list[int]]]:
    """Pad every field's rows to `target` (rows already longer stay as they are)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side={side!r}; expected 'left' or 'right'")
    out = {}
    for key, values in rows.items():
        fill = pad_values.get(key)
        if fill is None:
            out[key] = values
            continue
        padded = []
        for row in values:
            gap = target - len(row)
            if gap <= 0:
                padded.append(row)
            elif side == "right":
                padded.append(row + [fill] * gap)
            else:
                padded.append([fill] * gap + row)
        out[key] = padded
    return out
