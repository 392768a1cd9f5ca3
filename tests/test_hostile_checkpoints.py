"""Hostile and broken checkpoint directories (issue 20): every file is crafted here, tiny. The oracles are the
`safetensors` library (which headers it refuses), transformers (which checkpoints it loads), and exact
arithmetic (a NaN is not finite); reads outside the model directory are caught by planting a file there."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from qwen2 import Qwen2ForCausalLM
from qwen2.loading.safetensors import CheckpointError, read_header

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _write(path: Path, header: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _json(header: dict) -> bytes:
    return json.dumps(header).encode()


# (header bytes, data bytes): files the safetensors library refuses, each for a different rule.
REFUSED = {
    "overlapping offsets": (_json({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}), bytes(12)),
    "gap before a tensor": (_json({"a": _entry("F32", [1], 4, 8)}), bytes(8)),
    "bytes no tensor covers": (_json({"a": _entry("F32", [1], 0, 4)}), bytes(8)),
    "empty header, stray bytes": (b"{}", bytes(4)),
    "float offsets": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0.0,4]}}', bytes(4)),
    "float shape": (b'{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', bytes(4)),
    "negative shape": (b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', bytes(4)),
    "unknown dtype": (_json({"a": _entry("f32", [1], 0, 4)}), bytes(4)),
    "shape disagrees with offsets": (_json({"a": _entry("F32", [3], 0, 8)}), bytes(8)),
    "shape overflows": (_json({"a": _entry("F32", [2**32, 2**32, 2**32], 0, 4)}), bytes(4)),
    "deeply nested metadata": (b'{"__metadata__":' + b"[" * 5000 + b"]" * 5000 + b"}", b""),
    "deeply nested objects": (b'{"a":' + b'{"b":' * 3000 + b"1" + b"}" * 3000 + b"}", b""),
    "non-string metadata": (b'{"__metadata__":{"a":1}}', b""),
    "not an object": (b"[1, 2]", b""),
    "invalid UTF-8": (b'{"\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "trailing NUL bytes in the header": (_json({"a": _entry("F32", [1], 0, 4)}) + b"\0\0", bytes(4)),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_headers_the_safetensors_library_refuses_are_refused(tmp_path, case):
    path = _write(tmp_path / "model.safetensors", *REFUSED[case])
    with pytest.raises(Exception):  # the oracle: the library itself refuses this file
        with safe_open(str(path), framework="pt"):
            pass
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_header(path)


@pytest.mark.parametrize("header,data", [
    (_json({"b": _entry("F32", [1], 4, 8), "a": _entry("F32", [1], 0, 4)}), bytes(8)),  # any order in the JSON
    (_json({"__metadata__": {"format": "pt"}, "s": _entry("BF16", [], 0, 2)}), bytes(2)),  # a scalar
    (_json({"z": _entry("F32", [0, 3], 0, 0), "a": _entry("I8", [3], 0, 3)}) + b"   ", bytes(3)),  # empty, padding
    (b"{}", b""),
])
def test_headers_the_library_accepts_are_accepted(tmp_path, header, data):
    path = _write(tmp_path / "model.safetensors", header, data)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    assert set(read_header(path)) - {"__metadata__"} == names


def test_duplicate_names_are_refused(tmp_path):
    """The library keeps the last of two equal entries; a file naming a tensor twice is refused here."""
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(CheckpointError, match="'a' appears twice"):
        read_header(_write(tmp_path / "model.safetensors", header, bytes(4)))
    metadata = b'{"__metadata__":{"k":"1","k":"2"}}'
    with pytest.raises(CheckpointError, match="'k' appears twice"):
        read_header(_write(tmp_path / "m.safetensors", metadata, b""))


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _shard(directory: Path, weight_map: object) -> None:
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shard_name", ["../elsewhere/model.safetensors", "{abs}", "sub/../../elsewhere/model.safetensors",
                                        "..", ""])
def test_index_shards_must_stay_inside_the_directory(saved, tmp_path, shard_name):
    """transformers opens such shards; we refuse them before opening anything."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(saved / "model.safetensors", outside / "model.safetensors")
    name = str(outside / "model.safetensors") if shard_name == "{abs}" else shard_name
    with safe_open(str(outside / "model.safetensors"), "pt") as f:
        _shard(saved, {key: name for key in f.keys()})
    with pytest.raises(CheckpointError, match="outside the model directory|must name a file inside"):
        Qwen2ForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], "model.safetensors", {"a": 3}, None])
def test_index_of_the_wrong_shape_is_a_checkpoint_error(saved, weight_map):
    _shard(saved, weight_map)
    with pytest.raises(CheckpointError, match="weight_map"):
        Qwen2ForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PK\x03\x04" + os.urandom(100),
                                     b"\x80\x02}q\x00."])  # random, empty, broken zip, a pickled empty dict
def test_garbage_pytorch_model_bin_is_a_checkpoint_error(saved, content):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(content)
    with pytest.raises((CheckpointError, ValueError), match="pytorch_model.bin|num_hidden_layers"):
        Qwen2ForCausalLM.from_pretrained(saved)


def _rewrite(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("name,index,value", [
    ("model.layers.1.mlp.down_proj.weight", (3, 7), float("nan")),
    ("model.embed_tokens.weight", (95, 31), float("inf")),
    ("model.norm.weight", (0,), float("-inf")),
    ("model.layers.0.self_attn.q_proj.bias", (5,), float("nan")),
])
def test_non_finite_weights_are_refused_naming_the_tensor(saved, name, index, value):
    _rewrite(saved, lambda t: t[name].__setitem__(index, value))
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match=f"{name}.*NaN or Inf.*allow_non_finite"):
            Qwen2ForCausalLM.from_pretrained(saved, dtype=dtype)
    model = Qwen2ForCausalLM.from_pretrained(saved, allow_non_finite=True)
    assert not torch.isfinite(model.state_dict()[name][index])


def test_non_finite_weights_are_refused_when_quantising(saved):
    _rewrite(saved, lambda t: t["model.layers.0.mlp.up_proj.weight"].__setitem__((1, 1), float("nan")))
    for scheme in ("int8", "int4"):
        with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight.*NaN or Inf"):
            Qwen2ForCausalLM.from_pretrained(saved, quantization=scheme)


def test_overflow_to_float16_is_refused(saved):
    """1e6 is finite in float32 but not in float16: the weights as they would be used are checked."""
    _rewrite(saved, lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
    Qwen2ForCausalLM.from_pretrained(saved, dtype=torch.float32)
    with pytest.raises(ValueError, match="model.norm.weight.*float16"):
        Qwen2ForCausalLM.from_pretrained(saved, dtype=torch.float16)


@pytest.mark.parametrize("name,dtype", [("model.norm.weight", torch.int32), ("lm_head.weight", torch.int8),
                                        ("model.layers.0.self_attn.k_proj.bias", torch.int64)])
def test_integer_tensor_for_a_float_weight_is_refused(saved, name, dtype):
    _rewrite(saved, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(ValueError, match=f"{name}.*stored as {dtype}"):
        Qwen2ForCausalLM.from_pretrained(saved)


def _claim_layers(saved, layers: int) -> None:
    """Rewrite the saved config to claim `layers` layers over the checkpoint's 2."""
    config = json.loads((saved / "config.json").read_text())
    config.update(num_hidden_layers=layers, layer_types=None)
    (saved / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layers", [3, 1000, 20_000, 65_536])
def test_config_with_more_layers_than_the_checkpoint_fails_fast(saved, layers):
    _claim_layers(saved, layers)
    with pytest.raises(ValueError, match=f"num_hidden_layers={layers:,}.*2 layer"):
        Qwen2ForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("layers", [1_000_000, 10**9, 2**63])
def test_absurd_layer_count_is_refused_by_the_config(saved, layers):
    _claim_layers(saved, layers)
    with pytest.raises(ValueError, match=f"config.json.*num_hidden_layers={layers:,}"):
        Qwen2ForCausalLM.from_pretrained(saved)
