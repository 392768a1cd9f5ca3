"""GGUF reading, dequantisation, name mapping and conversion.

References: gguf-py's `gguf.quants.dequantize` for every block type, files written with gguf-py's
`GGUFWriter` (then corrupted, in the style of llama.cpp's test-gguf.cpp) for the parser, and
transformers' own load of the real default GGUF for config, weights and logits.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file

from qwen2.loading import gguf as qgguf
from qwen2.loading.dequant import SUPPORTED_TYPES, dequantize
from qwen2.loading.gguf import (GGUFError, GGUFFile, config_dict_from_gguf, convert_gguf, gguf_config,
                                gguf_to_directory, load_gguf_state_dict)
from qwen2.loading.names import GGUF_TO_HF, gguf_to_hf, hf_to_gguf
from qwen2.loading.safetensors import CheckpointError, checkpoint_files

# Byte offsets of the float16 scale fields in each block layout (ggml-common.h), so random blocks can
# be given realistic scales; the remaining bytes are uniformly random quants.
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82],
              T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0]}
FLOAT_TYPES = {T.F32: np.float32, T.F16: np.float16}


@pytest.fixture
def deadline():
    """Fail instead of hanging: a damaged file must be refused in well under this time."""
    def on_alarm(*_):
        raise TimeoutError("GGUF reading hung")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def random_blocks(ggml_type: T, n_blocks: int, rng: np.random.Generator, sane_scales: bool) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if ggml_type in FLOAT_TYPES:
        return rng.standard_normal(n_blocks).astype(FLOAT_TYPES[ggml_type]).view(np.uint8).reshape(n_blocks, -1)
    if ggml_type == T.BF16:
        return gguf.quants.quantize(rng.standard_normal((n_blocks,)).astype(np.float32), T.BF16).reshape(n_blocks, -1)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if sane_scales:
        for offset in F16_FIELDS[ggml_type]:
            scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
            blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


# -------------------------------------------------------------------------------------------- dequantisation

@pytest.mark.parametrize("ggml_type", sorted(SUPPORTED_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
@pytest.mark.parametrize("sane_scales", [True, False], ids=["scaled", "raw-bytes"])
def test_dequantize_equals_gguf_reference(ggml_type, sane_scales):
    rng = np.random.default_rng(ggml_type.value)
    block_size, _ = GGML_QUANT_SIZES[ggml_type]
    blocks = random_blocks(ggml_type, 3000, rng, sane_scales)
    # Several rows, so row-major block order is exercised too.
    shape = (6, 500 * block_size)
    expected = gguf.quants.dequantize(blocks.reshape(6, -1), ggml_type).reshape(shape)
    ours = dequantize(torch.from_numpy(blocks), ggml_type, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    # Bitwise equal, including any NaN/inf raw bytes produce.
    torch.testing.assert_close(ours, torch.from_numpy(np.ascontiguousarray(expected)), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_dequantize_round_trips_gguf_quantize(ggml_type):
    """Blocks produced by gguf-py's quantiser (real encoder output, not random bytes) decode like its decoder."""
    weights = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    blocks = gguf.quants.quantize(weights, ggml_type)
    ours = dequantize(torch.from_numpy(blocks), ggml_type, weights.shape)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(blocks, ggml_type)))
    assert (ours - torch.from_numpy(weights)).abs().mean() < 0.1  # and it is actually close to the unit-normal input


def test_dequantize_handles_more_blocks_than_one_chunk(monkeypatch):
    monkeypatch.setattr("qwen2.loading.dequant._CHUNK_ELEMENTS", 256 * 7)
    blocks = random_blocks(T.Q6_K, 50, np.random.default_rng(3), sane_scales=True)
    ours = dequantize(torch.from_numpy(blocks), T.Q6_K, (50, 256))
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(blocks, T.Q6_K)))


_THREADS_AFTER_DEQUANTISING = """
import threading, torch
from qwen2.loading.dequant import dequantize
from gguf import GGMLQuantizationType as T
torch.set_num_threads(2)
dequantize(torch.zeros(4, 34, dtype=torch.uint8), T.Q8_0, (128,))
later = []
thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
thread.start(); thread.join()
print(torch.get_num_threads(), later[0])
"""


def test_dequantizing_leaves_the_thread_count_of_threads_started_later():
    # The workers run single-threaded; a thread started afterwards (the chat's background compile) got 1 too,
    # so the decode step compiled for it was refused by its guards in the 2-thread chat. A fresh process: the
    # worker pool is made once per process.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _THREADS_AFTER_DEQUANTISING], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["2", "2"]


def test_dequantize_refuses_unsupported_type_by_name():
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        dequantize(torch.zeros(1, 66, dtype=torch.uint8), T.IQ2_XXS, (256,))


# ------------------------------------------------------------------------------------------------ names

def test_name_map_round_trips_every_qwen2_tensor():
    all_names = [t.format(layer) for layer in (0, 7, 23) for t in GGUF_TO_HF]
    hf_names = [gguf_to_hf(n) for n in all_names]
    assert None not in hf_names
    assert [hf_to_gguf(n) for n in hf_names] == all_names
    assert gguf_to_hf("blk.17.attn_q.weight") == "model.layers.17.self_attn.q_proj.weight"
    assert gguf_to_hf("output.weight") == "lm_head.weight"
    assert gguf_to_hf("blk.01.attn_q.weight") is None and gguf_to_hf("rope_freqs.weight") is None
    assert hf_to_gguf("model.layers.3.self_attn.rotary_emb.inv_freq") is None


def test_name_map_matches_gguf_py_tensor_mapping():
    """llama.cpp's own qwen2 name table (gguf-py's TensorNameMap) maps our names to the same GGUF names."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 4)
    for template, hf_template in GGUF_TO_HF.items():
        hf_name = hf_template.format(2)
        base, suffix = hf_name.rsplit(".", 1)
        assert name_map.get_name(base) + "." + suffix == template.format(2), hf_name


# ------------------------------------------------------------------------------------------ tiny GGUF files

TOKENS = (list("abcdefghijklmnopqrstuvwxyz0123456789")
          + [a + b for a, b in zip("abcdefghijklmnopqrstuvwxyz", "bcdefghijklmnopqrstuvwxyza")]
          + ["<|endoftext|>", "<|im_end|>"])
MERGES = [f"{t[0]} {t[1]}" for t in TOKENS[36:62]]
TINY = dict(vocab=64, hidden=64, heads=4, kv_heads=2, ffn=256, layers=2)
# One tensor type per role, so the file exercises several block layouts and the name map at once.
TINY_TYPES = {"token_embd": T.Q8_0, "output": T.Q4_0, "attn_q": T.Q5_0, "attn_k": T.F16, "attn_v": T.BF16,
              "attn_output": T.Q4_1, "ffn_gate": T.Q5_1, "ffn_up": T.IQ4_NL, "ffn_down": T.Q4_K}


def tiny_tensors(rng: np.random.Generator, tied: bool = False) -> dict[str, tuple[np.ndarray, T]]:
    """GGUF name -> (stored array: float or raw uint8 blocks, ggml type) for a tiny Qwen2."""
    h, f, v, kv = TINY["hidden"], TINY["ffn"], TINY["vocab"], TINY["kv_heads"] * TINY["hidden"] // TINY["heads"]
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    if not tied:
        shapes["output.weight"] = (v, h)
    for i in range(TINY["layers"]):
        shapes.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                       f"blk.{i}.attn_q.weight": (h, h), f"blk.{i}.attn_q.bias": (h,),
                       f"blk.{i}.attn_k.weight": (kv, h), f"blk.{i}.attn_k.bias": (kv,),
                       f"blk.{i}.attn_v.weight": (kv, h), f"blk.{i}.attn_v.bias": (kv,),
                       f"blk.{i}.attn_output.weight": (h, h), f"blk.{i}.ffn_gate.weight": (f, h),
                       f"blk.{i}.ffn_up.weight": (f, h), f"blk.{i}.ffn_down.weight": (h, f)})
    out = {}
    for name, shape in shapes.items():
        role = name.split(".")[-2]
        ggml_type = TINY_TYPES.get(role, T.F32)
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if ggml_type == T.F32:
            out[name] = (values, ggml_type)
        elif ggml_type == T.F16:
            out[name] = (values.astype(np.float16), ggml_type)
        elif ggml_type in (T.Q4_K, T.IQ4_NL):  # gguf-py has no quantiser for these: random sane blocks
            blocks = random_blocks(ggml_type, values.size // GGML_QUANT_SIZES[ggml_type][0], rng, True)
            out[name] = (blocks.reshape(shape[0], -1), ggml_type)
        else:
            out[name] = (gguf.quants.quantize(values, ggml_type), ggml_type)
    return out


def write_tiny_gguf(path: Path, *, arch: str = "qwen2", tied: bool = False, skip_keys: tuple[str, ...] = (),
                    extra_tensors: dict | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny Qwen2 GGUF with gguf-py's writer; return gguf-py's dequantisation of each tensor."""
    tensors = {**tiny_tensors(np.random.default_rng(seed), tied), **(extra_tensors or {})}
    writer = gguf.GGUFWriter(str(path), arch)
    keys = {"block_count": TINY["layers"], "context_length": 128, "embedding_length": TINY["hidden"],
            "feed_forward_length": TINY["ffn"], "attention.head_count": TINY["heads"],
            "attention.head_count_kv": TINY["kv_heads"]}
    for key, value in keys.items():
        if key not in skip_keys:
            writer.add_uint32(f"{arch}.{key}", value)
    if "attention.layer_norm_rms_epsilon" not in skip_keys:
        writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 1e6)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "qwen2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * 62 + [3, 3])
    writer.add_token_merges(MERGES)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 62)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 63)
    writer.add_uint32("tokenizer.ggml.padding_token_id", 62)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    reference = {}
    for name, (array, ggml_type) in tensors.items():
        raw = ggml_type not in (T.F32, T.F16)
        writer.add_tensor(name, array, raw_dtype=ggml_type if raw else None)
        reference[name] = gguf.quants.dequantize(array, ggml_type) if ggml_type in SUPPORTED_TYPES else None
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_file_reads_back(tiny):
    path, reference = tiny
    gf = GGUFFile(path)
    assert gf.architecture == "qwen2" and gf.version == 3
    assert set(gf.tensors) == set(reference)
    ggml_type, shape, blocks = gf.tensor_blocks("blk.1.ffn_down.weight")
    assert ggml_type == T.Q4_K and shape == (64, 256) and blocks.shape == (64, 144) and blocks.dtype == torch.uint8


def test_tiny_state_dict_is_gguf_py_dequantised_under_hf_names(tiny):
    path, reference = tiny
    state_dict = load_gguf_state_dict(path)
    assert set(state_dict) == {gguf_to_hf(name) for name in reference}
    for name, expected in reference.items():
        assert torch.equal(state_dict[gguf_to_hf(name)], torch.from_numpy(np.ascontiguousarray(expected))), name
    halves = load_gguf_state_dict(path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in halves.values())


def test_tiny_config(tiny, tmp_path):
    config = gguf_config(tiny[0])
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads) == (64, 64, 256, 2, 4, 2)
    assert config.max_position_embeddings == 128 and config.rope_parameters["rope_theta"] == 1e6
    assert config.rms_norm_eps == float(np.float32(1e-6))
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (62, 63, 62)
    assert config.tie_word_embeddings is False
    tied = tmp_path / "tied.gguf"
    write_tiny_gguf(tied, tied=True)
    assert gguf_config(tied).tie_word_embeddings is True
    assert "lm_head.weight" not in load_gguf_state_dict(tied)


def test_metadata_equals_gguf_py_reader(tiny):
    ours, reference = GGUFFile(tiny[0]), gguf.GGUFReader(tiny[0])
    keys = [key for key in reference.fields if not key.startswith("GGUF.")]
    assert ours.keys() == keys and len(keys) == 19
    for key in keys:
        assert ours.get(key) == reference.fields[key].contents(), key
    assert ours.array_length("tokenizer.ggml.tokens") == len(TOKENS) and ours.array_length("qwen2.block_count") is None


def test_tokenizer_metadata_is_what_was_written(tiny):
    metadata = GGUFFile(tiny[0]).tokenizer_metadata()
    assert metadata["tokenizer.ggml.tokens"] == TOKENS and metadata["tokenizer.ggml.merges"] == MERGES
    assert metadata["tokenizer.ggml.token_type"] == [1] * 62 + [3, 3]
    assert metadata["tokenizer.ggml.eos_token_id"] == 63 and metadata["tokenizer.ggml.add_bos_token"] is False
    assert metadata["general.architecture"] == "qwen2" and metadata["qwen2.context_length"] == 128
    assert "qwen2.block_count" not in metadata


# ----------------------------------------------------------------------------------- malformed-file corpus

def _patched(src: Path, dst: Path, edits: dict[int, bytes] | None = None, size: int | None = None) -> Path:
    data = bytearray(src.read_bytes())
    for offset, value in (edits or {}).items():
        data[offset:offset + len(value)] = value
    dst.write_bytes(bytes(data[:size]))
    return dst


def _tensor_entry(data: bytes, name: str) -> int:
    """Offset just past the name of tensor `name` in the tensor table (n_dims comes next)."""
    encoded = struct.pack("<Q", len(name)) + name.encode()
    return data.rindex(encoded) + len(encoded)


def _expect(path: Path, *fragments: str) -> GGUFError:
    with pytest.raises(GGUFError) as info:
        load_gguf_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_bad_magic(tiny, tmp_path, deadline):
    _expect(_patched(tiny[0], tmp_path / "m.gguf", {0: b"GGUX"}), "not a GGUF file")
    _expect(_patched(tiny[0], tmp_path / "empty.gguf", size=0), "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFF])
def test_unsupported_version(tiny, tmp_path, deadline, version):
    _expect(_patched(tiny[0], tmp_path / "v.gguf", {4: struct.pack("<I", version)}), f"version {version}")


def test_truncated_everywhere(tiny, tmp_path, deadline):
    size = tiny[0].stat().st_size
    data_start = GGUFFile(tiny[0]).data_offset
    cuts = [2, 4, 12, 23, 24, 30, 100, 500, 1000, data_start - 40, data_start - 1, data_start,
            data_start + 100, size // 2, size - 1]
    for cut in cuts:
        _expect(_patched(tiny[0], tmp_path / f"cut{cut}.gguf", size=cut))


def test_truncated_data_names_the_tensor(tiny, tmp_path, deadline):
    err = _expect(_patched(tiny[0], tmp_path / "t.gguf", size=tiny[0].stat().st_size - 1), "truncated")
    assert "tensor" in str(err)


@pytest.mark.parametrize("field_offset,label", [(8, "tensors"), (16, "metadata keys")])
def test_huge_counts(tiny, tmp_path, deadline, field_offset, label):
    for count in (2**31, 2**63 - 1, 2**64 - 1):
        _expect(_patched(tiny[0], tmp_path / "c.gguf", {field_offset: struct.pack("<Q", count)}), "claims", label)


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"])
def test_huge_array_count(tiny, tmp_path, deadline, key):
    """gguf-py's reader loops for ever over an array count past the end of the file; we refuse it at once."""
    data = tiny[0].read_bytes()
    count_at = data.index(key.encode()) + len(key) + 4 + 4  # key, then value type, then element type
    _expect(_patched(tiny[0], tmp_path / "a.gguf", {count_at: struct.pack("<Q", 2**40)}), "claims", "elements")


def test_huge_block_count(tiny, tmp_path, deadline):
    data = tiny[0].read_bytes()
    value_at = data.index(b"qwen2.block_count") + len("qwen2.block_count") + 4
    _expect(_patched(tiny[0], tmp_path / "b.gguf", {value_at: struct.pack("<I", 2**32 - 1)}),
            "4,294,967,295 blocks")


def test_tensor_offset_out_of_range_or_misaligned(tiny, tmp_path, deadline):
    data = tiny[0].read_bytes()
    at = _tensor_entry(data, "blk.1.ffn_down.weight") + 4 + 2 * 8 + 4  # n_dims, 2 dims, type
    _expect(_patched(tiny[0], tmp_path / "o.gguf", {at: struct.pack("<Q", 2**40)}),
            "truncated", "'blk.1.ffn_down.weight'")
    _expect(_patched(tiny[0], tmp_path / "a.gguf", {at: struct.pack("<Q", 33)}), "alignment")
    _expect(_patched(tiny[0], tmp_path / "ov.gguf", {at: struct.pack("<Q", 0)}), "overlap")


def test_bad_tensor_entries(tiny, tmp_path, deadline):
    data = tiny[0].read_bytes()
    at = _tensor_entry(data, "blk.1.ffn_down.weight")
    _expect(_patched(tiny[0], tmp_path / "d.gguf", {at: struct.pack("<I", 5)}))  # 5 dims shifts the table
    _expect(_patched(tiny[0], tmp_path / "t.gguf", {at + 4 + 16: struct.pack("<I", 99)}),
            "'blk.1.ffn_down.weight'", "unknown ggml type id 99")
    # a row of 255 elements cannot hold whole 256-element Q4_K blocks
    _expect(_patched(tiny[0], tmp_path / "r.gguf", {at + 4: struct.pack("<Q", 255)}), "not a multiple")
    _expect(_patched(tiny[0], tmp_path / "n.gguf", {at + 4: struct.pack("<Q", 2**62)}), "'blk.1.ffn_down.weight'")


def test_duplicates(tiny, tmp_path, deadline):
    data = tiny[0].read_bytes()
    bos = data.index(b"tokenizer.ggml.bos_token_id")
    _expect(_patched(tiny[0], tmp_path / "k.gguf", {bos: b"tokenizer.ggml.eos_token_id"}), "Duplicate")
    k_bias = _tensor_entry(data, "blk.0.attn_k.bias") - len("blk.0.attn_k.bias")
    _expect(_patched(tiny[0], tmp_path / "t.gguf", {k_bias: b"blk.0.attn_q.bias"}), "duplicated")


def test_bad_alignment(tmp_path, deadline):
    path = tmp_path / "align.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_uint32("general.alignment", 3)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="alignment"):
        GGUFFile(path)


def test_other_architecture_is_refused_by_name(tmp_path, deadline):
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, arch="llama")
    _expect(path, "'llama'", "qwen2")


def test_missing_metadata_key_is_named(tmp_path, deadline):
    path = tmp_path / "nokey.gguf"
    write_tiny_gguf(path, skip_keys=("feed_forward_length",))
    _expect(path, "'qwen2.feed_forward_length'")


def test_unsupported_tensor_type_is_named(tmp_path, deadline):
    path = tmp_path / "iq2.gguf"
    blocks = np.zeros((64, 66), np.uint8)  # IQ2_XXS: 66 bytes per 256 elements; a 64x256 "extra" tensor
    write_tiny_gguf(path, extra_tensors={"blk.0.ffn_down.weight": (blocks, T.IQ2_XXS)})
    _expect(path, "'blk.0.ffn_down.weight'", "IQ2_XXS")


def test_wrong_tensor_shape_is_named(tmp_path, deadline):
    path = tmp_path / "shape.gguf"
    write_tiny_gguf(path, extra_tensors={"blk.1.attn_q.bias": (np.zeros(32, np.float32), T.F32)})
    _expect(path, "'blk.1.attn_q.bias'", "shape")


EXTREMES = [0, 1, 255, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       extreme=st.none() | st.tuples(st.integers(0, 10**6), st.sampled_from(EXTREMES)))
def test_random_header_corruption_is_an_error_or_a_valid_file(tiny, tmp_path, deadline, flips, extreme):
    """Fuzz the header with byte flips and extreme 64-bit counts: the result is a loadable file or a
    GGUFError, never another exception or a hang."""
    data_start = GGUFFile(tiny[0]).data_offset
    edits = {i % data_start: bytes([b]) for i, b in flips}
    if extreme is not None:
        edits[extreme[0] % (data_start - 8)] = struct.pack("<Q", extreme[1])
    try:
        load_gguf_state_dict(_patched(tiny[0], tmp_path / "fuzz.gguf", edits))
    except GGUFError:
        pass


# --------------------------------------------------------------------------------------------- conversion

def _assert_found_without_reading(path: Path, target: Path) -> None:
    """gguf_to_directory finds its cached directory again doing none of the work: not a byte of the GGUF is
    opened (no re-hash), it is not parsed, nothing is written."""
    opened = []
    real_open = open

    def watched_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == path.resolve():
            opened.append(file)
        return real_open(file, *args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("a cache hit parsed or converted the GGUF")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("builtins.open", watched_open)
        patch.setattr(qgguf, "GGUFFile", refused)
        patch.setattr(qgguf, "_write_model_dir", refused)
        assert gguf_to_directory(path, progress=False) == target
    assert opened == []


def test_conversion_is_cached_and_complete(tiny, cache):
    """The cache holds config and tokenizer files and a record of the GGUF; the weights come from the GGUF."""
    from qwen2 import Qwen2ForCausalLM

    path, reference = tiny
    target = gguf_to_directory(path, progress=False)
    assert target.parent == cache / "gguf" and len(target.name) == 64
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "generation_config.json", "gguf_source.json", "merges.txt", "tokenizer.json",
        "tokenizer_config.json", "vocab.json"]
    assert checkpoint_files(target) == ([path.resolve()], None)
    expected = load_gguf_state_dict(path)
    for dtype in (torch.float32, torch.bfloat16):
        weights = Qwen2ForCausalLM.from_pretrained(target, dtype=dtype).state_dict()
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k].to(dtype)) for k in weights)
    assert json.loads((target / "generation_config.json").read_text()) == {
        "bos_token_id": 62, "eos_token_id": 63, "pad_token_id": 62}
    assert not list(target.parent.glob(".*partial"))
    _assert_found_without_reading(path, target)


def test_failed_conversion_leaves_nothing(tiny, cache, monkeypatch):
    def explode(directory, *args):
        (Path(directory) / "gguf_source.json").write_text("{")
        raise RuntimeError("disk full")
    monkeypatch.setattr(qgguf, "record_source", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_to_directory(tiny[0], progress=False)
    assert [p.name for p in (cache / "gguf").iterdir()] == ["sha256.json"]


def test_stale_partial_of_dead_process_is_removed(tiny, cache):
    stale = cache / "gguf" / ".abc.999999999.x1y2.partial"
    stale.mkdir(parents=True)
    gguf_to_directory(tiny[0], progress=False)
    assert not stale.exists()


def test_concurrent_conversions_agree(tiny, cache):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        targets = list(pool.map(lambda _: gguf_to_directory(tiny[0], progress=False), range(3)))
    assert len(set(targets)) == 1 and (targets[0] / "gguf_source.json").is_file()
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == sorted([targets[0].name, "sha256.json"])


def test_hash_is_recomputed_when_the_file_changes(tmp_path, cache):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, seed=1)
    first = gguf_to_directory(path, progress=False)
    write_tiny_gguf(path, seed=2)
    os.utime(path, ns=(1, 1))  # a different mtime, as any rewrite gives
    assert gguf_to_directory(path, progress=False) != first


def test_bad_file_never_reaches_the_cache(tiny, tmp_path, cache):
    bad = _patched(tiny[0], tmp_path / "bad.gguf", size=tiny[0].stat().st_size - 10)
    with pytest.raises(GGUFError):
        gguf_to_directory(bad, progress=False)
    assert not [p for p in (cache / "gguf").iterdir() if p.name != "sha256.json"]


def test_convert_gguf_dtype_and_refusal_to_overwrite(tiny, tmp_path):
    out = convert_gguf(tiny[0], tmp_path / "out", dtype=torch.bfloat16, progress=False)
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert_gguf(tiny[0], out, progress=False)
    convert_gguf(tiny[0], out, dtype=torch.float16, progress=False, overwrite=True)
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.float16
    with pytest.raises(ValueError, match="int8"):
        convert_gguf(tiny[0], tmp_path / "x", dtype=torch.int8, progress=False)


def test_cache_follows_the_file_and_refuses_a_changed_one(tiny, tmp_path, cache):
    """A copy elsewhere shares the cache directory and the record follows it; once the recorded file changes
    or goes, loading the directory names it instead of reading another model's weights."""
    from qwen2 import Qwen2ForCausalLM

    first = gguf_to_directory(tiny[0], progress=False)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny[0].read_bytes())
    assert gguf_to_directory(copy, progress=False) == first
    assert checkpoint_files(first)[0] == [copy.resolve()]
    legacy = first / "model.safetensors"  # what earlier versions cached: removed on the next lookup
    legacy.write_bytes(b"old float32 weights")
    Qwen2ForCausalLM.from_pretrained(copy)
    assert not legacy.exists()
    copy.unlink()
    with pytest.raises(CheckpointError, match="copy.gguf"):
        Qwen2ForCausalLM.from_pretrained(first)
    (first / "gguf_source.json").write_text("{")
    with pytest.raises(CheckpointError, match="gguf_source.json"):
        Qwen2ForCausalLM.from_pretrained(first)
    assert gguf_to_directory(tiny[0], progress=False) == first  # resolving the file again repairs the record
    assert checkpoint_files(first)[0] == [tiny[0].resolve()]


def test_converted_tiny_directory_loads_in_transformers(tiny, tmp_path):
    import transformers
    target = convert_gguf(tiny[0], tmp_path / "converted", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(target)
    ours = load_gguf_state_dict(tiny[0])
    theirs = model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.config.eos_token_id == 63 and model.generation_config.pad_token_id == 62


# --------------------------------------------------------------------------------------- quantised loading

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}  # half an ulp, relative


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_load_takes_4_bit_blocks_as_they_are(tiny, dtype):
    """int4 group 32 from a GGUF: Q4_0/Q4_1/Q4_K tensors (output, attn_output, ffn_down here) keep their codes,
    with each block's own scale and zero, so dequantised they are gguf-py's values up to the rounding of
    scale and zero to `dtype` (relative error <= u each, so |error| <= u (|q - 8| |scale| + |zero|)) plus
    float32 rounding on both sides (a few 2^-24 of the largest term). Every other tensor is quantised exactly
    as `quantize_model` quantises the float load (the dequantise-then-quantise path)."""
    from qwen2 import Qwen2ForCausalLM
    from qwen2.quantization import Int4WeightOnlyLinear, quantize_model
    from qwen2.quantization.int4 import unpack_nibbles

    path, reference = tiny
    direct = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, quantization="int4", group_size=32)
    old = quantize_model(Qwen2ForCausalLM.from_pretrained(path, dtype=dtype), "int4", 32)
    assert direct.config.quantization_config == old.config.quantization_config
    types = {name: info.ggml_type for name, info in GGUFFile(path).tensors.items()}
    seen = set()
    for name, module in direct.named_modules():
        if not isinstance(module, Int4WeightOnlyLinear):
            continue
        gguf_name = hf_to_gguf(f"{name}.weight")
        if types[gguf_name] not in (T.Q4_0, T.Q4_1, T.Q4_K):
            theirs = old.get_submodule(name)
            assert torch.equal(module.plain_weight(), theirs.plain_weight()), name
            assert torch.equal(module.scales_and_zeros, theirs.scales_and_zeros), name
            continue
        seen.add(types[gguf_name])
        n, k = module.out_features, module.in_features
        codes = unpack_nibbles(module.plain_weight()).view(n, k // 32, 32).double()
        scale, zero = (module.scales_and_zeros[..., i].t().double()[..., None] for i in (0, 1))
        ours = (codes - 8) * scale + zero
        expected = torch.from_numpy(np.ascontiguousarray(reference[gguf_name])).double().view(n, k // 32, 32)
        bound = UNIT_ROUNDOFF[dtype] * ((codes - 8).abs() * scale.abs() + zero.abs()) \
            + 2.0 ** -21 * (16 * scale.abs() + zero.abs())
        assert ((ours - expected).abs() <= bound).all(), name
    assert seen == {T.Q4_0, T.Q4_1, T.Q4_K}


def test_int8_load_equals_quantising_the_float_load(tiny):
    from qwen2 import Qwen2ForCausalLM
    from qwen2.quantization import quantize_model

    path, _ = tiny
    loaded = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization="int8").state_dict()
    expected = quantize_model(Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16), "int8").state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


# ------------------------------------------------------------------------------------- the real default GGUF

@pytest.mark.slow
def test_real_config_matches_transformers(default_gguf, hf_gguf_model):
    ours, theirs = gguf_config(default_gguf), hf_gguf_model.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings", "hidden_act", "use_sliding_window", "sliding_window",
                  "max_window_layers", "layer_types", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.head_dim == theirs.hidden_size // theirs.num_attention_heads


@pytest.mark.slow
def test_real_state_dict_matches_transformers(default_gguf, hf_gguf_model):
    """Every tensor, q/k included (no permutation for qwen2), equals transformers' GGUF load exactly."""
    start = time.perf_counter()
    ours = load_gguf_state_dict(default_gguf)
    print(f"dequantised the default GGUF in {time.perf_counter() - start:.1f} s")
    theirs = hf_gguf_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    types = {info.ggml_type for info in GGUFFile(default_gguf).tensors.values()}
    assert types == {T.F32, T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0}


def _prompt_ids(tokenizer) -> torch.Tensor:
    text = "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]\n" * 20
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :200]
    assert ids.shape == (1, 200)
    return ids


@pytest.mark.slow
def test_real_cache_directory(default_gguf, hf_gguf_tokenizer):
    """The default GGUF's cache directory (the real cache the other real-model tests share): found again
    without reading the 491 MB file, no weights copy in it, and its tokenizer files tokenize as transformers' GGUF tokenizer."""
    import transformers

    target = gguf_to_directory(default_gguf, progress=False)
    _assert_found_without_reading(default_gguf, target)
    assert checkpoint_files(target) == ([default_gguf.resolve()], None)
    assert not list(target.glob("*.safetensors"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    assert tokenizer(["héllo wörld\n  <|im_start|>user"]).input_ids == \
        hf_gguf_tokenizer(["héllo wörld\n  <|im_start|>user"]).input_ids


@pytest.mark.slow
def test_our_model_from_the_gguf_matches_transformers(our_gguf_model, hf_gguf_model, hf_gguf_tokenizer):
    ids = _prompt_ids(hf_gguf_tokenizer)
    with torch.no_grad():
        expected = hf_gguf_model(ids).logits[0, -1]
        got = our_gguf_model(ids).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
