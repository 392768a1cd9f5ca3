"""Reading GGUF files (llama.cpp's format) safely: metadata, tensor table, and the data as a memory map.

Builds on gguf-py's `GGUFReader`, with every read bounds-checked first: on a damaged file the plain reader
crashes with numpy errors or, given a huge array count, loops for ever. Every problem becomes a `GGUFError`
naming the file. What the tensors mean for a Qwen2 model is `gguf.py`'s business.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from qwen2.loading.dequant import SUPPORTED_TYPES, dequantize

ARCHITECTURE = "qwen2"
SUPPORTED_VERSIONS = (2, 3)  # v1 counted in 32 bits and predates every Qwen2 file
_MAX_DIMS = 4  # GGML_MAX_DIMS
_V = GGUFValueType
_SCALAR_SIZES = {_V.UINT8: 1, _V.INT8: 1, _V.BOOL: 1, _V.UINT16: 2, _V.INT16: 2, _V.UINT32: 4, _V.INT32: 4,
                 _V.FLOAT32: 4, _V.UINT64: 8, _V.INT64: 8, _V.FLOAT64: 8}
# The fewest bytes one value of each type takes: used to reject counts the file cannot hold.
_MIN_VALUE_SIZE = {**_SCALAR_SIZES, _V.STRING: 8, _V.ARRAY: 12}
_MIN_VALUE_SIZE_BY_ID = {int(t): size for t, size in _MIN_VALUE_SIZE.items()}
_ARRAY_ID, _STRING_ID = int(_V.ARRAY), int(_V.STRING)
_SCALAR_TYPES_BY_ID = {int(t): t for t in _SCALAR_SIZES}
_U64 = struct.Struct("<Q")
_MIN_KV_SIZE = 8 + 4 + 1  # empty key, type, one byte
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


class GGUFError(ValueError):
    """A GGUF file that cannot be read as a Qwen2 checkpoint; the message names the file and the problem."""


class _Corrupt(Exception):
    """A structural problem found inside the reader; `GGUFFile` adds the file name."""


class _CheckedReader(GGUFReader):
    """`GGUFReader` with bounds-checked reads, plausible array counts, validated tensor entries, and
    arrays parsed whole rather than one numpy view per element."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        data = self.__dict__.get("_bytes")
        if data is None:
            # A plain ndarray over the mapping: np.memmap's per-slice bookkeeping costs seconds on a
            # 150k-token vocabulary.
            data = self._bytes = self.data.view(np.ndarray)
        dtype, count = np.dtype(dtype), int(count)
        end = offset + dtype.itemsize * count
        if count < 0 or end > data.shape[0]:
            raise _Corrupt(f"truncated: reading {end - offset} bytes at offset {offset} runs past the end of "
                           f"the file ({data.shape[0]} bytes)")
        values = data[offset:end].view(dtype)
        order = self.byte_order if override_order is None else override_order
        return values if order == "I" else values.view(dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple:
        if int(raw_type) != _ARRAY_ID:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_item_type, raw_count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item_type, count, start = int(raw_item_type[0]), int(raw_count[0]), orig_offs + 12
        if item_type not in _MIN_VALUE_SIZE_BY_ID:
            raise _Corrupt(f"a metadata array at offset {orig_offs} has unknown element type {item_type}")
        if count * _MIN_VALUE_SIZE_BY_ID[item_type] > self._bytes.shape[0] - start:
            raise _Corrupt(f"a metadata array at offset {orig_offs} claims {count:,} elements, more than the "
                           f"rest of the file can hold (corrupt or truncated)")
        # gguf-py parses arrays one numpy view per element: seconds for a 150k-token vocabulary. Scalars
        # become one view (which `contents()` reads the same way); strings become their bytes plus a
        # table of (offset, length) that `GGUFFile.get` decodes.
        if item_type in _SCALAR_TYPES_BY_ID:
            values = self._get(start, self.gguf_scalar_to_np[_SCALAR_TYPES_BY_ID[item_type]], count)
            return 12 + values.nbytes, [raw_item_type, raw_count, values], [2], [_V.ARRAY,
                                                                                 _SCALAR_TYPES_BY_ID[item_type]]
        if item_type == _STRING_ID:
            end, spans = self._string_spans(start, count)
            return end - orig_offs, [raw_item_type, raw_count, self._bytes[start:end], spans], [], [_V.ARRAY, _V.STRING]
        return super()._get_field_parts(orig_offs, raw_type)

    def _string_spans(self, pos: int, count: int) -> tuple[int, np.ndarray]:
        """Walk `count` length-prefixed strings from `pos`: (end offset, their (offset, length) from `pos`)."""
        data, start = memoryview(self._bytes), pos
        size = len(data)
        spans = []
        for _ in range(count):
            if pos + 8 > size:
                raise _Corrupt(f"truncated: a string at offset {pos} runs past the end of the file ({size} bytes)")
            (length,) = _U64.unpack_from(data, pos)
            pos += 8
            if pos + length > size:
                raise _Corrupt(f"truncated: a {length:,}-byte string at offset {pos} runs past the end of the "
                               f"file ({size} bytes)")
            spans.append((pos - start, length))
            pos += length
        return pos, np.array(spans, dtype=np.uint64).reshape(-1, 2)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        spans = sorted(_check_tensor_entry(field, start_offs, int(self.alignment), self._bytes.shape[0])
                       for field in fields)
        for (start, end, name), (next_start, _, next_name) in zip(spans, spans[1:]):
            if next_start < end:
                raise _Corrupt(f"tensors {name!r} and {next_name!r} overlap in the data section")
        super()._build_tensors(start_offs, fields)


def _check_tensor_entry(field: Any, data_start: int, alignment: int, file_size: int) -> tuple[int, int, str]:
    """Validate one tensor-table entry before GGUFReader maps it; return its byte span."""
    _, name_data, _, dims, raw_type, relative = field.parts
    name = bytes(name_data).decode("utf-8", errors="replace")
    try:
        ggml_type = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise _Corrupt(f"tensor {name!r} has unknown ggml type id {int(raw_type[0])}") from None
    dims = [int(d) for d in dims]
    if not 1 <= len(dims) <= _MAX_DIMS:
        raise _Corrupt(f"tensor {name!r} has {len(dims)} dimensions; ggml allows 1 to {_MAX_DIMS}")
    elements = math.prod(dims)
    if elements >= 1 << 62:
        raise _Corrupt(f"tensor {name!r} has an impossible shape {dims}")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if dims[0] % block_size:
        raise _Corrupt(f"tensor {name!r} ({ggml_type.name}) has rows of {dims[0]} elements, not a multiple of "
                       f"its {block_size}-element block")
    relative = int(relative[0])
    if relative % alignment:
        raise _Corrupt(f"tensor {name!r} starts at data offset {relative}, not a multiple of the alignment "
                       f"{alignment}")
    start, nbytes = data_start + relative, elements // block_size * type_size
    if start + nbytes > file_size:
        raise _Corrupt(f"truncated: tensor {name!r} ({ggml_type.name}, {nbytes:,} bytes at offset {start:,}) "
                       f"ends past the end of the file ({file_size:,} bytes)")
    return start, start + nbytes, name


def _check_preamble(path: Path) -> None:
    """Magic, version and counts, checked before GGUFReader trusts them."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file: it starts with {head[:4]!r} instead of b'GGUF'")
    if len(head) < 24:
        raise GGUFError(f"{path} is truncated: {size} bytes, too short for a GGUF header")
    version, tensor_count, kv_count = struct.unpack("<IQQ", head[4:])
    if version & 0xFFFF == 0 and version:
        raise GGUFError(f"{path} is a big-endian GGUF file, which is not supported")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path} is GGUF version {version}; only versions "
                        f"{' and '.join(map(str, SUPPORTED_VERSIONS))} are supported")
    if tensor_count * _MIN_TENSOR_INFO_SIZE + kv_count * _MIN_KV_SIZE > size - 24:
        raise GGUFError(f"{path} claims {tensor_count:,} tensors and {kv_count:,} metadata keys, more than a "
                        f"file of {size:,} bytes can hold (corrupt or truncated)")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: rows first
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A validated GGUF file: metadata, tensor table, and the tensor data as a memory map."""

    def __init__(self, path: str | os.PathLike, *, architecture: str | None = ARCHITECTURE) -> None:
        self.path = Path(path)
        _check_preamble(self.path)
        try:
            # "c": a private mapping, writable in principle, so torch can wrap it without copying or warning
            reader = _CheckedReader(self.path, "c")
        except _Corrupt as err:
            raise GGUFError(f"{self.path}: {err}") from None
        except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, RecursionError) as err:
            raise GGUFError(f"{self.path} has a corrupt GGUF header: {err}") from None
        self._reader = reader
        self._data = torch.from_numpy(reader._bytes)
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                               int(t.data_offset), int(t.n_bytes))
            for t in reader.tensors
        }
        if architecture is not None and self.architecture != architecture:
            raise GGUFError(f"{self.path} holds a {self.architecture!r} model; only {architecture!r} "
                            f"(Qwen2 / Qwen2.5) GGUF files are supported")

    @property
    def architecture(self) -> str:
        return self.require("general.architecture", str)

    @property
    def data_offset(self) -> int:
        """Where the tensor data section starts."""
        return int(self._reader.data_offset)

    @property
    def version(self) -> int:
        return self.get("GGUF.version")

    def keys(self) -> list[str]:
        return [key for key in self._reader.fields if not key.startswith("GGUF.")]

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value as plain Python (int, float, bool, str or list), or `default` when absent."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            if field.types == [_V.ARRAY, _V.STRING] and not field.data:  # see _CheckedReader._get_field_parts
                blob = field.parts[-2].tobytes()
                return [blob[offset:offset + length].decode("utf-8") for offset, length in field.parts[-1].tolist()]
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as err:
            raise GGUFError(f"{self.path}: metadata key {key!r} is unreadable ({err})") from None

    def require(self, key: str, kind: type = object) -> Any:
        """A metadata value that must be present and, if `kind` is int or float, a number of that kind."""
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path} lacks the required metadata key {key!r}")
        accepted = (int, float) if kind is float else kind
        if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
            raise GGUFError(f"{self.path}: metadata key {key!r} = {value!r} is not {kind.__name__}")
        return value

    def array_length(self, key: str) -> int | None:
        """Length of an array-valued key without decoding its elements (a vocabulary has 150k)."""
        field = self._reader.fields.get(key)
        return int(field.parts[4][0]) if field is not None and field.types[:1] == [_V.ARRAY] else None

    def tensor_info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path} has no tensor {name!r}")
        return info

    def tensor_blocks(self, name: str) -> tuple[GGMLQuantizationType, tuple[int, ...], torch.Tensor]:
        """`(ggml_type, shape, blocks)`: the raw uint8 `(n_blocks, type_size)` blocks in row-major order,
        zero-copy over the file; `blocks.view(rows, -1, type_size)` groups them by row."""
        info = self.tensor_info(name)
        type_size = GGML_QUANT_SIZES[info.ggml_type][1]
        return info.ggml_type, info.shape, self._data[info.offset:info.offset + info.nbytes].view(-1, type_size)

    def dequantize(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor as `dtype`, in torch's shape order."""
        ggml_type, shape, blocks = self.tensor_blocks(name)
        if ggml_type not in SUPPORTED_TYPES:
            raise _unsupported(self, name, ggml_type)
        return dequantize(blocks, ggml_type, shape, dtype)

    def check_supported(self) -> None:
        """Refuse, by tensor and type name, a file holding a tensor type we cannot dequantise."""
        for info in self.tensors.values():
            if info.ggml_type not in SUPPORTED_TYPES:
                raise _unsupported(self, info.name, info.ggml_type)

    def tokenizer_metadata(self) -> dict[str, Any]:
        """The tokenizer's view of the metadata, as `qwen2.tokenizer.gguf.tokenizer_metadata_from_gguf` gives it."""
        arch = self.get("general.architecture")
        wanted = {"general.architecture", f"{arch}.context_length"} if arch else set()
        metadata = {key: self.get(key) for key in self.keys() if key.startswith("tokenizer.") or key in wanted}
        if "tokenizer.ggml.tokens" not in metadata:
            raise GGUFError(f"{self.path} lacks the required metadata key 'tokenizer.ggml.tokens': "
                            "it carries no tokenizer")
        return metadata


def _unsupported(gf: GGUFFile, name: str, ggml_type: GGMLQuantizationType) -> GGUFError:
    supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
    return GGUFError(f"{gf.path}: tensor {name!r} has ggml type {ggml_type.name}, which is not supported "
                     f"(supported: {supported})")


def open_gguf(gguf: str | os.PathLike | GGUFFile) -> GGUFFile:
    """`gguf` itself if already open, else the file at that path, validated."""
    return gguf if isinstance(gguf, GGUFFile) else GGUFFile(gguf)
