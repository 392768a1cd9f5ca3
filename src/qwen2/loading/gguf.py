"""Qwen2 GGUF files (llama.cpp's format): config, weights and the cache directory.

Files are opened through `gguf_reader.py` (bounds-checked; every problem a `GGUFError` naming the file).
Weights are dequantised in torch (`dequant.py`) and renamed through `names.py`. `gguf_to_directory` gives
a file a transformers-layout directory in the cache, keyed by its sha256, with the config and tokenizer
files and a record naming the GGUF, which stays the weights file: `iter_gguf_sources` dequantises it
straight into the model's parameters.

Why not a float32 safetensors conversion (what this cache held before): loading the default model from
its 491 MB GGUF (about 2 s in bfloat16 on 2 cores, dequantisation included) is no slower than reading
back its 2.5 GB float32 conversion was, so the copy bought no speed; it cost 2.5 GB of disk, a first-use
conversion and a float32 round trip for bfloat16 loads, and quantised loads need the GGUF's blocks anyway
(`quantization/gguf.py`). `convert_gguf` still writes real safetensors directories on request.

The config follows transformers' GGUF loader (`integrations/ggml.py`, `modeling_gguf_pytorch_utils.py`
in 5.24): the same `qwen2.*` keys, vocab_size from the token list, tied embeddings when the file has
no `output.weight`, and the bos/eos/pad/unk ids from `tokenizer.ggml.*`.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import torch
from gguf import GGML_QUANT_SIZES

from qwen2.config import Qwen2Config
from qwen2.loading import names
from qwen2.loading.default_model import cache_dir
from qwen2.loading.dequant import dequantize
from qwen2.loading.gguf_reader import ARCHITECTURE, GGUFError, GGUFFile, TensorInfo, open_gguf
from qwen2.loading.safetensors import GGUF_SOURCE_NAME, bytes_of, file_stamp, read_exact, row_span

logger = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_READ_BYTES = 1 << 23  # blocks per file read when filling a tensor, into one buffer reused for the whole file


# ------------------------------------------------------------------------------------------------ config

def config_dict_from_gguf(gguf: str | os.PathLike | GGUFFile) -> dict[str, Any]:
    """The transformers `config.json` dict a Qwen2 GGUF's metadata describes."""
    gf = open_gguf(gguf)
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
    gf = open_gguf(gguf)
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
    gf = open_gguf(gguf)
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
    gf = open_gguf(gguf)
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
    """A fresh hidden sibling of `target` to write into, named with our pid so leftovers can be reclaimed.
    Made by `os.mkdir`, so its mode follows the umask as any directory the user makes (not mkdtemp's 0700)."""
    while True:
        partial = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
        try:
            partial.mkdir()
            return partial
        except FileExistsError:
            continue


def _remove_stale_partials(parent: Path, name: str = "*") -> None:
    """Delete the `.partial` directories of `name` whose writer process is gone (killed mid-conversion)."""
    for partial in parent.glob(f".{name}.*.partial"):
        try:
            pid = int(partial.name.rsplit(".", 3)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("Removing %s, left by a conversion that was killed", partial)
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
    _remove_stale_partials(out.parent, glob.escape(out.name))
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
    stamp = file_stamp(path)
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
    with open(path, "rb") as f, tqdm(total=stamp["size"], unit="B", unit_scale=True, desc=f"Hashing {path.name}",
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


def record_source(directory: Path, gguf_path: Path, sha256: str) -> None:
    """Point `directory`'s record at `gguf_path` (atomically; a no-op when it already does)."""
    record = {"path": str(gguf_path), **file_stamp(gguf_path), "sha256": sha256}
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
            record_source(partial, path, sha256)
            try:
                os.rename(partial, target)
            except OSError:
                if not target.is_dir():  # another process publishing the same file first is fine
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        logger.info("Cached the config and tokenizer of %s in %s", path, target)
    record_source(target, path, sha256)
    legacy = target / "model.safetensors"  # the float32 conversion earlier versions cached
    if legacy.is_file():
        legacy.unlink(missing_ok=True)
        logger.info("Removed %s: the weights are now read from %s itself", legacy, path)
    return target
