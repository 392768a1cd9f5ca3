"""`BatchEncoding`: the dict a tokenizer call returns, with attribute access, tensor conversion and `.to()`."""

from __future__ import annotations

import copy
from collections import UserDict
from typing import Any

import numpy as np

from qwen2.tokenizer.alignment import CharSpan, TokenSpan

TENSOR_TYPES = ("pt", "np")


def _tensor_type(value: Any) -> str | None:
    if value is None:
        return None
    name = getattr(value, "value", value)  # accept transformers' TensorType enum members too
    if name not in TENSOR_TYPES:
        raise ValueError(f"return_tensors={value!r} is not supported; use 'pt', 'np' or None")
    return name


class BatchEncoding(UserDict):
    """Tokenizer output: `enc["input_ids"]` or `enc.input_ids`; slices select rows of every field."""

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        encoding: Any = None,
        tensor_type: str | None = None,
        prepend_batch_axis: bool = False,
        n_sequences: int | None = None,
    ) -> None:
        super().__init__(data)
        # The per-row `Encoding`s, or a callable computing them on first use (they cost extra work).
        self._encodings = encoding
        self._n_sequences = n_sequences
        self.convert_to_tensors(tensor_type, prepend_batch_axis=prepend_batch_axis)

    @property
    def n_sequences(self) -> int | None:
        return self._n_sequences

    @property
    def encodings(self) -> list[Any] | None:
        """The `Encoding` of each row: its tokens, offsets, words and sequences."""
        if callable(self._encodings):
            self._encodings = self._encodings()
        return self._encodings

    @property
    def is_fast(self) -> bool:
        return self._encodings is not None

    def __getitem__(self, item: str | int | slice) -> Any:
        if isinstance(item, str):
            return self.data[item]
        if isinstance(item, slice):
            return {key: value[item] for key, value in self.data.items()}
        if isinstance(item, int) and self._encodings is not None:
            return self.encodings[item]
        raise KeyError(f"BatchEncoding keys are field names, row indices or slices, got {item!r}")

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__") or item in ("data", "_encodings", "_n_sequences"):
            raise AttributeError(item)
        try:
            return self.data[item]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {item!r}; it has {sorted(self.data)}") from None

    def __getstate__(self) -> dict[str, Any]:
        return {"data": self.data, "encodings": self.encodings, "n_sequences": self._n_sequences}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.data = state.get("data", {})
        self._encodings = state.get("encodings")
        self._n_sequences = state.get("n_sequences")

    def __deepcopy__(self, memo: dict[int, Any]) -> "BatchEncoding":
        # A pending alignment is a call on the tokenizer: share it rather than copy the whole tokenizer.
        pending = self._encodings if callable(self._encodings) else None
        state = {"data": self.data, "encodings": None if pending else self._encodings, "n_sequences": self._n_sequences}
        state = copy.deepcopy(state, memo)
        clone = BatchEncoding.__new__(BatchEncoding)
        clone.__setstate__(state)
        clone._encodings = pending if pending is not None else state["encodings"]
        return clone

    # ---- alignment between tokens, words and characters (transformers' BatchEncoding methods) --------
    def _encoding(self, method: str, batch_index: int) -> Any:
        encodings = self.encodings
        if not encodings:
            raise ValueError(f"{method}() needs the token alignment, which this BatchEncoding does not have "
                             "(it was not made by a tokenizer call)")
        if not -len(encodings) <= batch_index < len(encodings):
            raise IndexError(f"batch index {batch_index} is out of range for {len(encodings)} rows")
        return encodings[batch_index]

    def _locate(self, method: str, first: int, second: int | None) -> tuple[Any, int]:
        """(encoding, index) from the `(index)` or `(batch_index, index)` call forms."""
        batch_index, index = (0, first) if second is None else (first, second)
        encoding = self._encoding(method, batch_index)
        return encoding, index

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The token strings of a row."""
        return self._encoding("tokens", batch_index).tokens

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of a row: 0 or 1 for the text of a pair it came from, None for padding."""
        return self._encoding("sequence_ids", batch_index).sequence_ids

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of a row: the index of the word (pre-tokenizer piece) it came from, None for padding."""
        return self._encoding("word_ids", batch_index).word_ids

    def token_to_sequence(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        encoding, index = self._locate("token_to_sequence", batch_or_token_index, token_index)
        return encoding.token_to_sequence(index if index >= 0 else len(encoding) + index)

    def token_to_word(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        encoding, index = self._locate("token_to_word", batch_or_token_index, token_index)
        return encoding.token_to_word(index if index >= 0 else len(encoding) + index)

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> CharSpan | None:
        encoding, index = self._locate("token_to_chars", batch_or_token_index, token_index)
        span = encoding.token_to_chars(index if index >= 0 else len(encoding) + index)
        return CharSpan(*span) if span is not None else None

    def word_to_tokens(self, batch_or_word_index: int, word_index: int | None = None,
                       sequence_index: int = 0) -> TokenSpan | None:
        encoding, index = self._locate("word_to_tokens", batch_or_word_index, word_index)
        span = encoding.word_to_tokens(index, sequence_index)
        return TokenSpan(*span) if span is not None else None

    def word_to_chars(self, batch_or_word_index: int, word_index: int | None = None,
                      sequence_index: int = 0) -> CharSpan | None:
        encoding, index = self._locate("word_to_chars", batch_or_word_index, word_index)
        span = encoding.word_to_chars(index, sequence_index)
        return CharSpan(*span) if span is not None else None

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None,
                      sequence_index: int = 0) -> int | None:
        encoding, index = self._locate("char_to_token", batch_or_char_index, char_index)
        return encoding.char_to_token(index, sequence_index)

    def char_to_word(self, batch_or_char_index: int, char_index: int | None = None,
                     sequence_index: int = 0) -> int | None:
        encoding, index = self._locate("char_to_word", batch_or_char_index, char_index)
        return encoding.char_to_word(index, sequence_index)

    def convert_to_tensors(self, tensor_type: str | None = None, prepend_batch_axis: bool = False) -> "BatchEncoding":
        """Turn the lists into int64 tensors ('pt') or arrays ('np'); ragged batches are an error."""
        kind = _tensor_type(tensor_type)
        if kind is None:
            return self
        for key, value in list(self.data.items()):
            if prepend_batch_axis:
                value = [value]
            if kind == "pt":
                import torch

                if torch.is_tensor(value):
                    continue
                self.data[key] = _as_tensor(key, value, _torch_tensor)
            elif not isinstance(value, np.ndarray):
                self.data[key] = _numpy_array(value)
        return self

    def to(self, device: Any, *, non_blocking: bool = False) -> "BatchEncoding":
        """Move every tensor to `device` (PyTorch only); other values are kept as they are."""
        self.data = {
            key: value.to(device=device, non_blocking=non_blocking) if hasattr(value, "to") else value
            for key, value in self.data.items()
        }
        return self


def _is_empty(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and (not value or all(_is_empty(v) for v in value))


def _torch_tensor(value: Any) -> Any:
    import torch

    return torch.tensor(value, dtype=torch.int64 if _is_empty(value) else None)


def _numpy_array(value: Any) -> np.ndarray:
    """Like transformers, a ragged batch becomes an object array of rows rather than an error."""
    if _is_empty(value):
        return np.asarray(value, dtype=np.int64)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, np.ndarray)):
        if len({len(row) for row in value}) > 1:
            rows = np.empty(len(value), dtype=object)
            rows[:] = [np.asarray(row) for row in value]
            return rows
    return np.asarray(value)


def _as_tensor(key: str, value: Any, convert: Any) -> Any:
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        lengths = {len(row) for row in value}
        if len(lengths) > 1:
            raise ValueError(
                f"cannot make a tensor of {key!r}: its rows have lengths {sorted(lengths)}; "
                "pass padding=True (and truncation=True) to get a rectangular batch"
            )
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot make a tensor of {key!r}: {exc}") from exc


def to_python(value: Any) -> Any:
    """Python lists from tensors and arrays (what decode and pad accept)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value
