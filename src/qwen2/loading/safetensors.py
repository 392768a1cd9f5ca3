"""Checkpoint files in transformers' layout: find them, validate them, stream their tensors, write them.

Reading hands out one `TensorSource` per tensor, which fills a tensor the loader allocated with plain file
reads (straight into it when the dtypes agree, through a small buffer when they do not). Nothing is
memory-mapped: mapped pages a process has touched count toward its resident memory, so a float32 file
mapped while a bfloat16 model is filled would double the peak. Headers are checked before any tensor is
read, so a truncated or corrupted download fails with the file's name and what is wrong with it. Pickle
checkpoints (`pytorch_model.bin`) are read only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
GGUF_SOURCE_NAME = "gguf_source.json"  # in a cached GGUF directory: which .gguf holds the weights

# The safetensors dtype codes and their element sizes in bytes (the format's own table).
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_FLOAT_CODES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_TORCH_DTYPES = {**_FLOAT_CODES, "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                 "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
                 "U64": torch.uint64, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn}
_CHUNK_BYTES = 1 << 24  # staging buffer for dtype conversion and device copies
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces


class CheckpointError(OSError):
    """A checkpoint file is missing, truncated or malformed; the message names the file."""


# ------------------------------------------------------------------------------------------------------- reading


def read_header(path: Path) -> dict[str, Any]:
    """Parse and bounds-check a safetensors header: every tensor must lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: it is only {size} bytes long (truncated?)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims {header_len} "
                                  f"bytes but the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} has a corrupted safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header: not a JSON object")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * _DTYPE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: the header entry for tensor {name!r} is malformed ({err!r})") from err
        if end > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section, "
                                  f"but only {data_size} bytes are present; download the file again")
        if not 0 <= begin <= end or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets {begin}..{end}, which do not match its "
                                  f"shape {info['shape']} and dtype {info['dtype']}")
    return header


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor, which is how transformers reads a checkpoint's dtype."""
    if path.suffix == ".gguf":
        return torch.float32  # what its blocks dequantise to, as in transformers
    if path.suffix == ".safetensors":
        header = read_header(path)
        for name, info in header.items():
            if name != "__metadata__" and info["dtype"] in _FLOAT_CODES:
                return _FLOAT_CODES[info["dtype"]]
        return None
    for _, tensor in _iter_pickle(path):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


class TensorSource(Protocol):
    """One checkpoint tensor, read on request into a tensor the loader allocated."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # of the values as stored (float32 for dequantised GGUF blocks)

    def read_into(self, out: torch.Tensor, start: int = 0) -> None:
        """Fill the contiguous CPU tensor `out` with rows `start:start + len(out)`, cast to `out.dtype`."""
        ...


def row_span(shape: tuple[int, ...], out: torch.Tensor, start: int) -> tuple[int, int]:
    """(first element, element count) of the rows `out` holds, starting at row `start`."""
    row = math.prod(shape[1:]) if shape else 1
    if start * row + out.numel() > math.prod(shape) or not out.is_contiguous():
        raise ValueError(f"cannot read {tuple(out.shape)} from row {start} of a {shape} tensor")
    return start * row, out.numel()


def bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def read_exact(f: BinaryIO, offset: int, buffer: memoryview, path: Path) -> None:
    """`readinto` until `buffer` is full; a short file is a truncated checkpoint."""
    f.seek(offset)
    while buffer.nbytes:
        n = f.readinto(buffer)
        if not n:
            raise CheckpointError(f"{path} is truncated: it ended while reading {buffer.nbytes} bytes at offset "
                                  f"{f.tell()}; download the file again")
        buffer = buffer[n:]


class FileTensor:
    """A tensor of a safetensors file: `offset` is where its data starts in the open file `f`. `buffer` (uint8,
    shared by the tensors of a file) stages dtype conversions: one allocation per file rather than one per
    tensor, which would leave the heap fragmented by hundreds of MB."""

    def __init__(self, f: BinaryIO, path: Path, dtype: torch.dtype, shape: tuple[int, ...], offset: int,
                 buffer: torch.Tensor) -> None:
        self.f, self.path, self.dtype, self.shape, self.offset, self.buffer = f, path, dtype, shape, offset, buffer

    def read_into(self, out: torch.Tensor, start: int = 0) -> None:
        first, count = row_span(self.shape, out, start)
        itemsize = self.dtype.itemsize
        offset = self.offset + first * itemsize
        if out.dtype == self.dtype:
            read_exact(self.f, offset, bytes_of(out), self.path)
            return
        step = self.buffer.numel() // itemsize
        buffer = self.buffer[:step * itemsize].view(self.dtype)
        flat = out.view(-1)
        for lo in range(0, count, step):
            part = buffer[:min(step, count - lo)]
            read_exact(self.f, offset + lo * itemsize, bytes_of(part), self.path)
            flat[lo:lo + part.numel()] = part


class LoadedTensor:
    """A tensor already in memory (from a pickle checkpoint), behind the same interface."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.dtype, self.shape = tensor, tensor.dtype, tuple(tensor.shape)

    def read_into(self, out: torch.Tensor, start: int = 0) -> None:
        first, count = row_span(self.shape, out, start)
        out.view(-1).copy_(self.tensor.reshape(-1)[first:first + count])


def read_tensor(source: TensorSource, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new `dtype` tensor on `device` filled from `source`; off the CPU through a small staging buffer."""
    out = torch.empty(source.shape, dtype=dtype, device=device)
    if out.device.type == "cpu":
        source.read_into(out)
        return out
    if out.dim() == 0:
        staging = torch.empty((), dtype=dtype)
        source.read_into(staging)
        return out.copy_(staging)
    rows = max(1, _CHUNK_BYTES // max(1, out[0].numel() * dtype.itemsize))
    staging = torch.empty(min(rows, out.shape[0]), *out.shape[1:], dtype=dtype)
    for lo in range(0, out.shape[0], rows):
        part = staging[:min(rows, out.shape[0] - lo)]
        source.read_into(part, lo)
        out[lo:lo + len(part)].copy_(part)
    return out


def iter_sources(path: Path) -> Iterator[tuple[str, TensorSource]]:
    """(name, source) for every tensor of one safetensors or `.bin` file; a source is valid until the next."""
    if path.suffix != ".safetensors":
        for name, tensor in _iter_pickle(path):
            yield name, LoadedTensor(tensor)
        return
    header = read_header(path)
    buffer = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, info in header.items():
            if name == "__metadata__":
                continue
            yield name, FileTensor(f, path, _TORCH_DTYPES[info["dtype"]], tuple(info["shape"]),
                                   data_start + info["data_offsets"][0], buffer)


def _iter_pickle(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """`torch.load` with `weights_only=True` (no code execution) and mmap, for the old zip format too."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint: {err}") from err
        state_dict = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as err:  # torch raises UnpicklingError, EOFError, zipfile errors, ...
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint (only plain tensors are "
                              f"allowed, nothing is executed): {err}") from err
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    for name in list(state_dict):
        yield name, state_dict.pop(name)


def gguf_weights(directory: Path) -> Path | None:
    """The GGUF a cached GGUF directory takes its weights from (see `gguf.gguf_to_directory`), or None.

    The record names the file with its size and mtime: a file changed or removed since is refused rather
    than read as weights for the wrong model.
    """
    record_path = directory / GGUF_SOURCE_NAME
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        path = Path(record["path"])
        stamp = (int(record["size"]), int(record["mtime_ns"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{record_path} is not a valid GGUF record ({err}); delete {directory} and load "
                              f"the .gguf file again") from err
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or (stat.st_size, stat.st_mtime_ns) != stamp:
        raise CheckpointError(f"{directory} takes its weights from {path}, which is gone or has changed since; "
                              f"load the .gguf file itself instead of this cache directory")
    return path


def checkpoint_files(directory: Path, use_safetensors: bool | None = None) -> tuple[list[Path], dict | None]:
    """The weight files of a model directory, in load order, and the index metadata if it is sharded.

    safetensors is preferred; `.bin` is used when there is no safetensors (or `use_safetensors=False`).
    A cached GGUF directory's weights are the GGUF itself.
    """
    gguf = gguf_weights(directory)
    if gguf is not None:
        return [gguf], None
    candidates = []
    if use_safetensors is not False:
        candidates += [(SAFE_WEIGHTS_INDEX_NAME, True), (SAFE_WEIGHTS_NAME, False)]
    if use_safetensors is not True:
        candidates += [(WEIGHTS_INDEX_NAME, True), (WEIGHTS_NAME, False)]
    for name, is_index in candidates:
        path = directory / name
        if path.is_file():
            return _read_index(path) if is_index else ([path], None)
    wanted = " or ".join(name for name, _ in candidates)
    raise CheckpointError(f"No model weights in {directory}: expected {wanted}")


def _read_index(index_path: Path) -> tuple[list[Path], dict]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path} is not a valid checkpoint index (needs a 'weight_map'): {err}") from err
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in shards if not (index_path.parent / name).is_file()]
    if missing:
        raise CheckpointError(f"{index_path} lists shard file(s) {missing} that are missing from "
                              f"{index_path.parent}; the download is incomplete")
    return [index_path.parent / name for name in shards], index.get("metadata") or {}


# ------------------------------------------------------------------------------------------------------- writing


def save_state_dict(state_dict: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str,
                    safe_serialization: bool = True, total_parameters: int | None = None) -> list[Path]:
    """Write `state_dict` as transformers does: one file, or numbered shards plus an index json.

    Returns the written weight files. Shards of an earlier save that this one does not overwrite are removed,
    so a directory never mixes two checkpoints.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    weights_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    index_name = SAFE_WEIGHTS_INDEX_NAME if safe_serialization else WEIGHTS_INDEX_NAME
    pattern = weights_name.replace(".", "{suffix}.", 1)
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=pattern,
                                               max_shard_size=_parse_size(max_shard_size))
    stem, ext = weights_name.split(".")
    shard_name = re.compile(rf"{stem}-\d{{5}}-of-\d{{5}}\.{ext}")
    for old in directory.iterdir():
        if shard_name.fullmatch(old.name) and old.name not in split.filename_to_tensors and old.is_file():
            old.unlink()
    (directory / index_name).unlink(missing_ok=True)  # rewritten below when this save is sharded
    if split.is_sharded:
        (directory / weights_name).unlink(missing_ok=True)

    written = []
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state_dict[name].detach().contiguous() for name in names}
        path = directory / filename
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, str(path), metadata={"format": "pt"})
        else:
            torch.save(shard, path)
        written.append(path)
    if split.is_sharded:
        metadata = dict(split.metadata)
        if total_parameters is not None:
            metadata = {"total_parameters": total_parameters, **metadata}
        index = {"metadata": metadata, "weight_map": split.tensor_to_filename}
        (directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(size: int | str) -> int:
    """`5000000`, `"5MB"` (powers of ten) or `"5MiB"` (powers of two), as transformers accepts."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be positive")
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B)\s*", str(size).upper())
    if match is None:
        raise ValueError(f"max_shard_size={size!r} is not a size; use an int (bytes) or a string like '500MB'")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value
