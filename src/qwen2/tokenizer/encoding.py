"""`BatchEncoding`: the dict a tokenizer call returns, with attribute access, tensor conversion and `.to()`."""

from __future__ import annotations

from collections import UserDict
from typing import Any

import numpy as np

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
        self._encodings = encoding
        self._n_sequences = n_sequences
        self.convert_to_tensors(tensor_type, prepend_batch_axis=prepend_batch_axis)

    @property
    def n_sequences(self) -> int | None:
        return self._n_sequences

    @property
    def encodings(self) -> Any:
        return self._encodings

    @property
    def is_fast(self) -> bool:
        return self._encodings is not None

    def __getitem__(self, item: str | int | slice) -> Any:
        if isinstance(item, str):
            return self.data[item]
        if isinstance(item, slice):
            return {key: value[item] for key, value in self.data.items()}
        if self._encodings is not None:
            return self._encodings[item]
        raise KeyError(f"BatchEncoding keys are field names or slices, got {item!r}")

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__") or item in ("data", "_encodings", "_n_sequences"):
            raise AttributeError(item)
        try:
            return self.data[item]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {item!r}; it has {sorted(self.data)}") from None

    def __getstate__(self) -> dict[str, Any]:
        return {"data": self.data, "encodings": self._encodings, "n_sequences": self._n_sequences}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.data = state.get("data", {})
        self._encodings = state.get("encodings")
        self._n_sequences = state.get("n_sequences")

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
