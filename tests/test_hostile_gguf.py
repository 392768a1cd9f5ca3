"""Hostile GGUF files and cache records (issue 20), crafted tiny with gguf-py's writer: records that point a
directory at another file, rewrites that keep size and mtime, tokenizer metadata of the wrong type,
duplicate tokens, meaningless rope bases, and the leftovers and modes of `convert`."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import gguf
import pytest

from qwen2 import Qwen2ForCausalLM
from qwen2.loading.gguf import GGUFError, convert_gguf, gguf_to_directory
from qwen2.loading.safetensors import CheckpointError, checkpoint_files
from qwen2.tokenizer.gguf import write_tokenizer_files
from test_gguf import MERGES, TOKENS, write_tiny_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def model_gguf(tmp_path) -> Path:
    path = tmp_path / "files" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    return path


# ----------------------------------------------------------------------------------- gguf_source.json records

def _planted_directory(tmp_path: Path, record: dict) -> Path:
    directory = tmp_path / "downloaded"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 64}))
    (directory / "gguf_source.json").write_text(json.dumps(record))
    return directory


@pytest.mark.parametrize("kind", ["foreign directory", "copied cache directory", "cache root itself"])
def test_a_record_outside_our_cache_is_not_trusted(tmp_path, cache, model_gguf, kind):
    """A directory anywhere but qwen2's cache naming a file in gguf_source.json must not load that file."""
    cached = gguf_to_directory(model_gguf, progress=False)
    record = json.loads((cached / "gguf_source.json").read_text())
    if kind == "foreign directory":
        directory = _planted_directory(tmp_path, record)
    elif kind == "copied cache directory":
        directory = tmp_path / cached.name
        shutil.copytree(cached, directory)
    else:
        directory = cache
        for name in ("gguf_source.json", "config.json"):
            shutil.copy(cached / name, cache / name)
    with pytest.raises(CheckpointError, match="only trusted inside qwen2's cache"):
        checkpoint_files(directory)
    with pytest.raises(CheckpointError, match="only trusted inside qwen2's cache"):
        Qwen2ForCausalLM.from_pretrained(directory)


def test_a_record_in_our_cache_naming_another_hash_is_refused(cache, model_gguf, tmp_path):
    cached = gguf_to_directory(model_gguf, progress=False)
    impostor = cached.parent / ("0" * 64)
    shutil.copytree(cached, impostor)
    with pytest.raises(CheckpointError, match="not its directory's"):
        checkpoint_files(impostor)


def test_the_default_models_stand_in_trusts_only_the_embedded_ggufs_record(cache, model_gguf):
    """cache/default/model (the embedded model with its hub generation config) holds a record too: there it
    may name only the embedded GGUF's sha256, so a planted record pointing at another file is refused."""
    cached = gguf_to_directory(model_gguf, progress=False)
    stand_in = cache / "default" / "model"
    shutil.copytree(cached, stand_in)
    with pytest.raises(CheckpointError, match="not its directory's"):
        checkpoint_files(stand_in)


def test_same_size_rewrite_with_restored_mtime_is_caught(cache, model_gguf):
    """The attack the size+mtime stamp missed: other weights, same size, mtime set back. The inode change
    time moves anyway, the file is hashed again, and the sha256 no longer matches the directory."""
    cached = gguf_to_directory(model_gguf, progress=False)
    before = model_gguf.stat()
    other = model_gguf.with_name("other.gguf")
    write_tiny_gguf(other, seed=7)
    assert other.stat().st_size == before.st_size
    with open(model_gguf, "r+b") as f:  # rewritten in place: same inode, as an editor saving in place would
        f.write(other.read_bytes())
    os.utime(model_gguf, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (model_gguf.stat().st_size, model_gguf.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(CheckpointError, match="gone or has changed"):
        checkpoint_files(cached)
    with pytest.raises(CheckpointError, match="gone or has changed"):
        Qwen2ForCausalLM.from_pretrained(cached)
    assert gguf_to_directory(model_gguf, progress=False) != cached  # the new contents get their own directory


def test_touched_but_unchanged_file_is_rehashed_and_kept(cache, model_gguf):
    cached = gguf_to_directory(model_gguf, progress=False)
    os.chmod(model_gguf, 0o600)  # changes the inode change time only
    assert checkpoint_files(cached) == ([model_gguf.resolve()], None)
    record = json.loads((cached / "gguf_source.json").read_text())
    assert record["ctime_ns"] == model_gguf.stat().st_ctime_ns  # refreshed: the next load does not hash


def test_a_record_of_the_older_format_is_rehashed_and_upgraded(cache, model_gguf):
    """Records written before the inode stamp (size and mtime only) still load the same file."""
    cached = gguf_to_directory(model_gguf, progress=False)
    record = json.loads((cached / "gguf_source.json").read_text())
    old = {key: record[key] for key in ("path", "size", "mtime_ns", "sha256")}
    (cached / "gguf_source.json").write_text(json.dumps(old))
    assert checkpoint_files(cached) == ([model_gguf.resolve()], None)
    assert json.loads((cached / "gguf_source.json").read_text()) == record


@pytest.mark.parametrize("record", [{"path": "/etc/hostname"}, [], {"path": 3, "sha256": None},
                                    {"path": "x", "size": "big", "mtime_ns": 0, "ctime_ns": 0, "inode": 0,
                                     "sha256": "x"}])
def test_malformed_records_in_the_cache_name_the_file(cache, model_gguf, record):
    cached = gguf_to_directory(model_gguf, progress=False)
    (cached / "gguf_source.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="gguf_source.json"):
        checkpoint_files(cached)


# ---------------------------------------------------------------------------------- tokenizer metadata types

def _metadata(**changes) -> dict:
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": list(TOKENS),
            "tokenizer.ggml.token_type": [1] * 62 + [3, 3], "tokenizer.ggml.merges": list(MERGES),
            "tokenizer.ggml.eos_token_id": 63, "tokenizer.chat_template": "{{ messages }}"}
    return {**base, **changes}


@pytest.mark.parametrize("key,value,message", [
    ("tokenizer.ggml.tokens", list(range(64)), "tokens must be an array of str, not an array holding int"),
    ("tokenizer.ggml.tokens", "abc", "tokens must be an array of str, not str"),
    ("tokenizer.ggml.merges", [1, 2, 3], "merges must be an array of str"),
    ("tokenizer.ggml.merges", ["a b c"], "merges holds 'a b c'"),
    ("tokenizer.ggml.token_type", ["x"] * 64, "token_type must be an array of int"),
    ("tokenizer.chat_template", 42, "chat_template must be a str, not int"),
    ("tokenizer.chat_template", ["{{ x }}"], "chat_template must be a str, not list"),
    ("tokenizer.ggml.eos_token_id", "63", "eos_token_id must be a int, not str"),
    ("tokenizer.ggml.eos_token_id", True, "eos_token_id must be a int, not bool"),
    ("tokenizer.ggml.add_bos_token", 1, "add_bos_token must be a bool"),
])
def test_tokenizer_metadata_of_the_wrong_type_names_the_key(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        write_tokenizer_files(_metadata(**{key: value}), tmp_path)


@pytest.mark.parametrize("tokens,ids", [
    (TOKENS[:10] + [TOKENS[3]] + TOKENS[11:], (3, 10)),
    (TOKENS[:-1] + [TOKENS[0]], (0, 63)),
    (TOKENS[:5] + ["Ġ"] + TOKENS[6:8] + [" "] + TOKENS[9:], (5, 8)),  # the same byte-level spelling twice
])
def test_duplicate_token_strings_are_refused(tmp_path, tokens, ids):
    """A vocabulary maps a string to one id: a repeated string would silently lose the other id."""
    with pytest.raises(ValueError, match=f"twice \\(ids {ids[0]} and {ids[1]}\\)"):
        write_tokenizer_files(_metadata(**{"tokenizer.ggml.tokens": tokens}), tmp_path)


def _with_metadata(path: Path, source: Path, changes: dict) -> Path:
    """A copy of the tiny GGUF `source` with some metadata values replaced (same types as gguf-py writes)."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = changes.pop(name, field.contents())
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, kind)
    for name, (value, kind) in changes.items():
        writer.add_key_value(name, value, kind)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("base", [0.0, -10000.0, float("nan"), float("inf")])
def test_meaningless_rope_base_is_refused(tmp_path, cache, model_gguf, base):
    bad = _with_metadata(tmp_path / "bad.gguf", model_gguf, {"qwen2.rope.freq_base": base})
    with pytest.raises(GGUFError, match="rope_theta"):
        Qwen2ForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan")])
def test_meaningless_rms_epsilon_is_refused(tmp_path, cache, model_gguf, eps):
    bad = _with_metadata(tmp_path / "bad.gguf", model_gguf, {"qwen2.attention.layer_norm_rms_epsilon": eps})
    with pytest.raises(GGUFError, match="rms_norm_eps"):
        Qwen2ForCausalLM.from_pretrained(bad)


def test_duplicate_tokens_in_a_file_are_refused(tmp_path, cache, model_gguf):
    tokens = list(TOKENS)
    tokens[20] = tokens[21]
    bad = _with_metadata(tmp_path / "bad.gguf", model_gguf, {"tokenizer.ggml.tokens": tokens})
    with pytest.raises(GGUFError, match="twice"):
        Qwen2ForCausalLM.from_pretrained(bad)


# ------------------------------------------------------------------------------------------------- convert

def test_convert_removes_leftovers_of_a_killed_run(tmp_path, model_gguf):
    out = tmp_path / "converted"
    dead = [tmp_path / f".converted.{pid}.ab12cd34.partial" for pid in (999_999_991, 999_999_992)]
    alive = tmp_path / f".converted.{os.getpid()}.ab12cd34.partial"  # a conversion still running: kept
    other = tmp_path / ".another.999999993.ab12cd34.partial"  # another target's: not ours to judge
    for directory in (*dead, alive, other):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"x" * 1000)
    convert_gguf(model_gguf, out, progress=False)
    assert not any(d.exists() for d in dead)
    assert alive.exists() and other.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_converted_directory_follows_the_umask(tmp_path, model_gguf, umask):
    previous = os.umask(umask)
    try:
        out = convert_gguf(model_gguf, tmp_path / "converted", progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------------------------------ non-finite weights

@pytest.mark.parametrize("name,value", [("blk.1.ffn_norm.weight", float("nan")), ("output_norm.weight", float("inf"))])
def test_non_finite_float_tensor_in_a_gguf_is_refused(tmp_path, cache, name, value):
    import numpy as np

    values = np.ones(64, dtype=np.float32)
    values[5] = value
    path = tmp_path / "nan.gguf"
    write_tiny_gguf(path, extra_tensors={name: (values, gguf.GGMLQuantizationType.F32)})
    with pytest.raises(ValueError, match=f"{name}.*NaN or Inf"):
        Qwen2ForCausalLM.from_pretrained(path)
    Qwen2ForCausalLM.from_pretrained(path, allow_non_finite=True)


@pytest.mark.parametrize("name,scale", [("token_embd.weight", b"\x00\x7e"), ("output.weight", b"\x00\x7c")])
def test_non_finite_block_scale_in_a_gguf_is_refused(tmp_path, cache, model_gguf, name, scale):
    """A quantised block whose float16 scale is NaN (0x7e00) or Inf (0x7c00) dequantises to non-finite values."""
    from qwen2.loading.gguf import GGUFFile

    offset = GGUFFile(model_gguf).tensors[name].offset + 3 * 34 if name == "token_embd.weight" else \
        GGUFFile(model_gguf).tensors[name].offset  # Q8_0 blocks are 34 bytes, the scale first
    raw = bytearray(model_gguf.read_bytes())
    raw[offset:offset + 2] = scale
    bad = tmp_path / "bad-scale.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{name}.*NaN or Inf"):
        Qwen2ForCausalLM.from_pretrained(bad)
