"""Qwen2 GGUF files (llama.cpp's format): validated reading, config, weights and the cached conversion.

Reading builds on gguf-py's `GGUFReader`, with every read bounds-checked first: on a damaged file
the plain reader crashes with numpy errors or, given a huge array count, loops for ever. Every
problem becomes a `GGUFError` naming the file. Weights are dequantised in torch (`dequant.py`) and
renamed through `names.py`. `gguf_to_directory` gives a file a transformers-layout directory in the
cache, keyed by its sha256, with the config and tokenizer files and a record naming the GGUF, which
stays the weights file: `iter_gguf_sources` dequantises it straight into the model's parameters.

Why not a float32 safetensors conversion (what this cache held before): dequantising the default
model's 491 MB takes about as long as reading back its 2.5 GB float32 conversion (~1.5 s on 2 cores),
so the copy bought no speed, cost 2.5 GB of disk, a first-use conversion, and a float32 round trip
for bfloat16 loads; and the quantised loads need the GGUF's blocks anyway (`quantization/gguf.py`).
`convert_gguf` still writes real safetensors directories on request.

The config follows transformers' GGUF loader (`integrations/ggml.py`, `modeling_gguf_pytorch_utils.py`
in 5.24): the same `qwen2.*` keys, vocab_size from the token list, tied embeddings when the file has
no `output.weight`, and the bos/eos/pad/unk ids from `tokenizer.ggml.*`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from qwen2.config import Qwen2Config
from qwen2.loading import names
from qwen2.loading.default_model import cache_dir
from qwen2.loading.dequant import SUPPORTED_TYPES, dequantize
from qwen2.loading.safetensors import GGUF_SOURCE_NAME, bytes_of, read_exact, row_span

logger = logging.getLogger(__name__)

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
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_READ_BYTES = 1 << 23  # blocks per file read when filling a tensor, into one buffer reused for the whole file


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


def _open(gguf: str | os.PathLike | GGUFFile) -> GGUFFile:
    return gguf if isinstance(gguf, GGUFFile) else GGUFFile(gguf)


# ------------------------------------------------------------------------------------------------ config

def config_dict_from_gguf(gguf: str | os.PathLike | GGUFFile) -> dict[str, Any]:
    """The transformers `config.json` dict a Qwen2 GGUF's metadata describes."""
    gf = _open(gguf)
    arch = ARCHITECTURE

    def key(name: str, kind: type = int) -> Any:
        return gf.require(f"{arch}.{name}", kind)

    heads = key("attention.head_count")
    vocab_size = gf.get(f"{arch}.vocab_size")
    if vocab_size is None:  # llama.cpp leaves it out: the token list is the vocabulary (transformers#32526)
        vocab_size = gf.array_length("tokenizer.ggml.tokens")
        if vocab_size is None:
            raise GGUFError(f"{gf.path} lacks both {arch}.vocab_size and tokenizer.ggml.tokens, so its "
                            f"vocabulary size is unknown")
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": gf.get(f"{arch}.attention.head_count_kv", heads),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", float),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": gf.get(f"{arch}.rope.freq_base", 10000.0)},
        "tie_word_embeddings": "output.weight" not in gf.tensors,
    }
    for name, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        if (value := gf.get(f"tokenizer.ggml.{gguf_key}")) is not None:
            config[name] = value
    scaling = [k for k in gf.keys() if k.startswith(f"{arch}.rope.scaling.")]
    if scaling:
        # transformers' loader ignores these too; we follow it so that both give the same model.
        logger.warning("%s: ignoring %s, as transformers does for qwen2 GGUF files", gf.path, ", ".join(scaling))
    return config


def gguf_config(gguf: str | os.PathLike | GGUFFile) -> Qwen2Config:
    """A `Qwen2Config` from a Qwen2 GGUF's metadata."""
    gf = _open(gguf)
    config = config_dict_from_gguf(gf)
    # Checked first: a corrupt count would otherwise build per-layer tables of billions of entries.
    if config["num_hidden_layers"] * sum("{}" in name for name in names.GGUF_TO_HF) > len(gf.tensors):
        raise GGUFError(f"{gf.path}: its metadata says {config['num_hidden_layers']:,} blocks, but the file holds "
                        f"only {len(gf.tensors)} tensors")
    try:
        return Qwen2Config.from_dict(config)
    except GGUFError:
        raise
    except ValueError as err:
        raise GGUFError(f"{gf.path}: its metadata describes an invalid model: {err}") from None


# ----------------------------------------------------------------------------------------------- weights

def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """GGUF name -> torch shape, for every tensor a Qwen2 model with this `Qwen2Config` holds."""
    hidden, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    per_layer = {
        "attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,),
        "attn_q.weight": (hidden, hidden), "attn_q.bias": (hidden,),
        "attn_k.weight": (kv, hidden), "attn_k.bias": (kv,),
        "attn_v.weight": (kv, hidden), "attn_v.bias": (kv,),
        "attn_output.weight": (hidden, hidden),
        "ffn_gate.weight": (ffn, hidden), "ffn_up.weight": (ffn, hidden), "ffn_down.weight": (hidden, ffn),
    }
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(config.num_hidden_layers):
        shapes.update({f"blk.{i}.{suffix}": shape for suffix, shape in per_layer.items()})
    return shapes


def _checked_tensors(gf: GGUFFile) -> list[tuple[str, str, tuple[int, ...]]]:
    """`[(gguf_name, hf_name, shape)]` in model order, after checking the config, names, shapes and types."""
    expected = _expected_shapes(gguf_config(gf))
    missing = [name for name in expected if name not in gf.tensors]
    if missing:
        raise GGUFError(f"{gf.path} lacks {len(missing)} tensor(s) a Qwen2 model with its metadata needs, "
                        f"starting with {missing[0]!r}")
    for name, shape in expected.items():
        if gf.tensors[name].shape != shape:
            raise GGUFError(f"{gf.path}: tensor {name!r} has shape {gf.tensors[name].shape}, but the metadata "
                            f"implies {shape}")
    extra = sorted(set(gf.tensors) - set(expected))
    if extra:
        logger.warning("%s: ignoring %d tensor(s) Qwen2 does not use: %s", gf.path, len(extra), ", ".join(extra[:5]))
    gf.check_supported()
    return [(name, names.gguf_to_hf(name), shape) for name, shape in expected.items()]


def iter_gguf_tensors(gguf: str | os.PathLike | GGUFFile,
                      dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """`(our_name, tensor)` for every weight, dequantised one at a time to keep peak memory to one tensor."""
    gf = _open(gguf)
    for gguf_name, hf_name, _ in _checked_tensors(gf):
        yield hf_name, gf.dequantize(gguf_name, dtype)


class GGUFTensor:
    """One tensor of a GGUF, read with plain file reads and dequantised into the caller's tensor.

    Not through the memory map: mapped pages a process touched count toward its resident memory, so
    reading the blocks through it would add the whole file to the peak of a load. `buffer` (uint8) is
    scratch space shared by the tensors of one file, so reading allocates nothing per chunk.
    """

    dtype = torch.float32  # what the blocks dequantise to

    def __init__(self, f: Any, path: Path, info: TensorInfo, buffer: torch.Tensor) -> None:
        self.f, self.path, self.name, self.buffer = f, path, info.name, buffer
        self.ggml_type, self.shape, self.offset = info.ggml_type, info.shape, info.offset
        self.block_size, self.type_size = GGML_QUANT_SIZES[info.ggml_type]

    def blocks(self, first: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The raw `(n, type_size)` uint8 blocks of elements `first:first + count` (whole blocks), in `out`'s
        storage when given."""
        if first % self.block_size or count % self.block_size:
            raise ValueError(f"{self.name}: elements {first}..{first + count} do not fall on "
                             f"{self.block_size}-element block boundaries")
        n = count // self.block_size * self.type_size
        out = torch.empty(n, dtype=torch.uint8) if out is None else out.view(-1)[:n]
        read_exact(self.f, self.offset + first // self.block_size * self.type_size, bytes_of(out), self.path)
        return out.view(-1, self.type_size)

    def read_into(self, out: torch.Tensor, start: int = 0) -> None:
        first, count = row_span(self.shape, out, start)
        step = max(1, self.buffer.numel() // self.type_size) * self.block_size
        flat = out.view(-1)
        for lo in range(0, count, step):
            n = min(step, count - lo)
            blocks = self.blocks(first + lo, n, self.buffer)
            dequantize(blocks, self.ggml_type, (n,), out.dtype, out=flat[lo:lo + n])


def iter_gguf_sources(gguf: str | os.PathLike | GGUFFile) -> Iterator[tuple[str, GGUFTensor]]:
    """`(our_name, source)` for every weight after checking the file; a source is valid until the next."""
    gf = _open(gguf)
    tensors = _checked_tensors(gf)
    buffer = torch.empty(_READ_BYTES, dtype=torch.uint8)
    with open(gf.path, "rb", buffering=0) as f:
        for gguf_name, hf_name, _ in tensors:
            yield hf_name, GGUFTensor(f, gf.path, gf.tensors[gguf_name], buffer)


def load_gguf_state_dict(gguf: str | os.PathLike | GGUFFile,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our (transformers-named) state dict of a Qwen2 GGUF, dequantised to `dtype`."""
    return dict(iter_gguf_tensors(gguf, dtype))


# ------------------------------------------------------------------------------------------- conversion

def _write_safetensors(path: Path, gf: GGUFFile, tensors: list[tuple[str, str, tuple[int, ...]]],
                       dtype: torch.dtype, bar: Any) -> None:
    """Stream the dequantised tensors into one safetensors file, one tensor in memory at a time."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, hf_name, shape in tensors:
        size = math.prod(shape) * itemsize
        header[hf_name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so the data starts 8-byte aligned
    def write(data: torch.Tensor) -> None:
        f.write(data.view(torch.uint8).numpy())
        bar.update(data.numel() * itemsize)

    # Writing 2 GB takes as long as dequantising it, so tensor i is written while tensor i + 1 is made.
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="qwen2-write") as writer:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        pending = None
        for gguf_name, _, _ in tensors:
            data = gf.dequantize(gguf_name, dtype).contiguous()
            if pending is not None:
                pending.result()
            pending = writer.submit(write, data)
        if pending is not None:
            pending.result()


def _write_model_dir(gf: GGUFFile, out_dir: Path, dtype: torch.dtype, progress: bool, weights: bool = True) -> None:
    """Config, generation config and tokenizer files, then (if `weights`) model.safetensors in `dtype`."""
    from tqdm.auto import tqdm

    from qwen2.tokenizer.gguf import write_tokenizer_files

    config = gguf_config(gf)
    tensors = _checked_tensors(gf)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    generation = {key: getattr(config, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(config, key) is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    try:
        write_tokenizer_files(gf.tokenizer_metadata(), out_dir)
    except GGUFError:
        raise
    except (ValueError, KeyError, IndexError) as err:
        raise GGUFError(f"{gf.path}: its tokenizer metadata cannot be converted: {err}") from None
    if not weights:
        return
    total = sum(math.prod(shape) for *_, shape in tensors) * torch.empty((), dtype=dtype).element_size()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Converting {gf.path.name}",
              disable=not progress) as bar:
        _write_safetensors(out_dir / "model.safetensors", gf, tensors, dtype, bar)


def _partial_dir(target: Path) -> Path:
    """A fresh hidden sibling of `target` to write into, named with our pid so leftovers can be reclaimed."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))


def _remove_stale_partials(parent: Path) -> None:
    """Delete `.partial` directories whose writer process is gone (killed mid-conversion)."""
    for partial in parent.glob(".*.partial"):
        try:
            pid = int(partial.name.rsplit(".", 3)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported for conversion; choose torch.float32, torch.bfloat16 "
                         f"or torch.float16")


# What `_write_model_dir` writes besides the weights.
_CONVERTED_FILES = frozenset({"config.json", "generation_config.json", "merges.txt", "tokenizer.json",
                              "tokenizer_config.json", "vocab.json", "model.safetensors.index.json"})


def _check_replaceable(out: Path) -> None:
    """Overwriting deletes `out`: only allow it when everything there looks like an earlier conversion's output."""
    foreign = [p.name for p in out.iterdir()
               if not (p.is_file() and (p.name in _CONVERTED_FILES or fnmatch.fnmatch(p.name, "model*.safetensors")))]
    if foreign:
        raise FileExistsError(f"{out} holds files a conversion did not write ({', '.join(sorted(foreign)[:5])}); "
                              f"refusing to delete them: choose another output directory")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 progress: bool = True, overwrite: bool = False) -> Path:
    """Convert a Qwen2 GGUF into a transformers-loadable directory (config, generation config, tokenizer,
    model.safetensors in `dtype`). Refuses a non-empty `out_dir` unless `overwrite`."""
    _check_dtype(dtype)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out} already exists and is not an empty directory; choose another output "
                              f"directory or pass overwrite=True (`qwen2 convert --overwrite`)")
    if out.is_dir() and overwrite:
        _check_replaceable(out)
    gf = GGUFFile(gguf_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_dir(out)
    try:
        _write_model_dir(gf, partial, dtype, progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _hash_index() -> Path:
    return cache_dir() / "gguf" / "sha256.json"


def file_sha256(path: str | os.PathLike, progress: bool = False) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a 500 MB GGUF is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_path = _hash_index()
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path)) if isinstance(index, dict) else None
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=stat.st_size, unit="B", unit_scale=True, desc=f"Hashing {path.name}",
                                     disable=not progress) as bar:
        while block := f.read(1 << 24):
            digest.update(block)
            bar.update(len(block))
    index = index if isinstance(index, dict) else {}
    index[str(path)] = {**stamp, "sha256": digest.hexdigest()}
    index_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{index_path.name}.", suffix=".tmp", dir=index_path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, index_path)
    return digest.hexdigest()


def _record_source(directory: Path, gguf_path: Path, sha256: str) -> None:
    """Point `directory`'s record at `gguf_path` (atomically; a no-op when it already does)."""
    stat = gguf_path.stat()
    record = {"path": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    record_path = directory / GGUF_SOURCE_NAME
    try:
        if json.loads(record_path.read_text(encoding="utf-8")) == record:
            return
    except (OSError, ValueError):
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{GGUF_SOURCE_NAME}.", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, record_path)


def gguf_to_directory(gguf_path: str | os.PathLike, *, progress: bool = True) -> Path:
    """The transformers-layout directory for a Qwen2 GGUF: config, generation config and tokenizer files,
    made on first use in `cache_dir()/gguf/<sha256>/` and published by an atomic rename, plus a record of
    the GGUF, which `from_pretrained` reads the weights from. A copy of the same file at another path
    shares the directory; the record names whichever path was resolved last."""
    path = Path(gguf_path).resolve()
    sha256 = file_sha256(path, progress=progress)
    target = cache_dir() / "gguf" / sha256
    if not target.is_dir():
        gf = GGUFFile(path)  # refuse a bad file before touching the cache
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(target.parent)
        partial = _partial_dir(target)
        try:
            _write_model_dir(gf, partial, torch.float32, progress, weights=False)
            _record_source(partial, path, sha256)
            try:
                os.rename(partial, target)
            except OSError:
                if not target.is_dir():  # another process publishing the same file first is fine
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        logger.info("Cached the config and tokenizer of %s in %s", path, target)
    _record_source(target, path, sha256)
    legacy = target / "model.safetensors"  # the float32 conversion earlier versions cached
    if legacy.is_file():
        legacy.unlink(missing_ok=True)
        logger.info("Removed %s: the weights are now read from %s itself", legacy, path)
    return target
