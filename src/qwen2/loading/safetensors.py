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

from qwen2.loading.paths import inside

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
    """Parse and check a safetensors header by the format's own rules, as the `safetensors` library applies
    them (tensors tile the data section exactly: no overlaps, no gaps, no trailing bytes), plus no
    duplicate names; every problem is a `CheckpointError` naming the file."""
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
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} has a corrupted safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header: not a JSON object")
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"
            and isinstance(info, dict) and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2 and type(info["data_offsets"][1]) is int]
    if ends and max(ends) > size - 8 - header_len:
        raise CheckpointError(f"{path} is truncated: its tensors end at byte {max(ends)} of the data section, but "
                              f"only {size - 8 - header_len} bytes are present; download the file again")
    _library_check(path)
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] not in _TORCH_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which torch cannot hold")
    return header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the name {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _library_check(path: Path) -> None:
    """Let the `safetensors` library validate the header (it only maps the file; no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # SafetensorError subclasses Exception directly
        raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from None


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
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state_dict = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as err:  # torch raises UnpicklingError, EOFError, zipfile errors, RuntimeError, ...
        # torch's own text suggests weights_only=False, which would run the file's code: only its first line.
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint of plain tensors (nothing in it "
                              f"is executed): {reason}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {type(state_dict).__name__})")
    for name in list(state_dict):
        yield name, state_dict.pop(name)


def file_stamp(path: Path) -> dict[str, int]:
    """What identifies a file's contents without reading them: size, mtime, and the inode change time,
    which no user call can set back, so a same-size rewrite with its mtime restored still shows."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def gguf_weights(directory: Path) -> Path | None:
    """The GGUF a cached GGUF directory takes its weights from (see `gguf.gguf_to_directory`), or None.

    The record is trusted only in qwen2's own cache: in the directory named by the file's sha256, or in the
    embedded model's stand-in for its hub id (`default_model.default_model_dir`), for the embedded GGUF's
    sha256 only; anywhere else a `gguf_source.json` could point a model directory at any file on the machine.
    A file whose stamp (`file_stamp`) changed since is hashed again and used only if its sha256 is still the
    one its directory stands for.
    """
    record_path = directory / GGUF_SOURCE_NAME
    if not record_path.is_file():
        return None
    from qwen2.loading.default_model import GGUF_SHA256, cache_dir

    cache = (cache_dir() / "gguf").resolve()
    resolved = directory.resolve()
    if resolved.parent == cache:
        expected_sha256 = resolved.name
    elif resolved == (cache_dir() / "default" / "model").resolve():
        expected_sha256 = GGUF_SHA256
    else:
        raise CheckpointError(f"{record_path}: a GGUF record is only trusted inside qwen2's cache ({cache}), and "
                              f"{directory} is not there; load the .gguf file itself")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        path, sha256 = Path(record["path"]), record["sha256"]
        stamp = {key: record.get(key) for key in ("size", "mtime_ns", "ctime_ns", "inode")}  # older: no ctime
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{record_path} is not a valid GGUF record ({err!r}); delete {directory} and load "
                              f"the .gguf file again") from None
    if sha256 != expected_sha256:
        raise CheckpointError(f"{record_path} names sha256 {sha256!r}, not its directory's; delete {directory} "
                              f"and load the .gguf file again")
    try:
        current = file_stamp(path)
    except OSError:
        current = None
    if current != stamp:
        from qwen2.loading.gguf import file_sha256, record_source

        if current is None or file_sha256(path) != sha256:
            raise CheckpointError(f"{directory} takes its weights from {path}, which is gone or has changed "
                                  f"since; load the .gguf file itself instead of this cache directory")
        record_source(directory, path, sha256)  # same bytes, new stamp (copied back, touched, ...)
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
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{index_path} is not a valid checkpoint index: {err}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must be a JSON object mapping each tensor name to its "
                              f"shard file, found {type(weight_map).__name__}")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{index_path}: 'metadata' must be a JSON object, found {type(metadata).__name__}")
    shards = [inside(index_path.parent, name, f"{index_path}: weight_map", CheckpointError)
              for name in dict.fromkeys(weight_map.values())]
    missing = [path.name for path in shards if not path.is_file()]
    if missing:
        raise CheckpointError(f"{index_path} lists shard file(s) {missing} that are missing from "
                              f"{index_path.parent}; the download is incomplete")
    return shards, metadata


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
