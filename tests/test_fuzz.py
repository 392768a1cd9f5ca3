"""Property-based fuzzing of everything that reads a model directory's files (issue 20): the GGUF reader,
the safetensors reader, the config loader, the tokenizer-file loaders and chat template rendering.

The property, as llama.cpp's GGUF fuzzer and safetensors' header fuzzer state it: every input either
loads or raises one of our errors (ValueError/OSError and their subclasses: GGUFError, CheckpointError,
TokenizerFileError, ChatTemplateLimitError), within time (hypothesis' per-example deadline) and memory
(the process' peak resident size) bounds. For safetensors headers the library itself is a second oracle:
we accept exactly the headers it accepts (duplicates and dtypes torch cannot hold aside).

CI runs a short pass; `QWEN2_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -p no:cacheprovider
--hypothesis-show-statistics` is the long run (README, "Hostile input").
"""

from __future__ import annotations

import json
import os
import resource
import struct
from datetime import timedelta
from pathlib import Path

import jinja2
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from safetensors import safe_open

from qwen2 import Qwen2Config
from qwen2.loading.gguf import GGUFFile, gguf_config, iter_gguf_sources
from qwen2.loading.safetensors import CheckpointError, iter_sources, read_header
from qwen2.tokenizer import Qwen2Tokenizer, Qwen2TokenizerFast
from qwen2.tokenizer.chat import render_conversations
from qwen2.tokenizer.gguf import write_tokenizer_files
from test_gguf import MERGES, TOKENS, write_tiny_gguf

EXAMPLES = int(os.environ.get("QWEN2_FUZZ_EXAMPLES", "800"))  # CI: ~40 s for the five targets
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), derandomize="QWEN2_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large], database=None)
OURS = (ValueError, OSError)  # every error type of ours derives from one of these
MEMORY_BOUND_KB = 3 * 1024 * 1024  # peak resident size of the test process: far below 24 GB, far above a tiny load


def _resident_kb() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


_START: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _memory_at_start() -> None:
    _START.update(peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resident=_resident_kb())


def _within_memory() -> None:
    """The process' peak resident size stays under the bound; where a heavier test earlier in the same
    process (a full suite's real-model tests) already set a higher peak, which would hide ours, what is
    resident now may not have grown by the bound instead."""
    if _START["peak"] < MEMORY_BOUND_KB:
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < MEMORY_BOUND_KB
    else:
        assert _resident_kb() - _START["resident"] < MEMORY_BOUND_KB


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------------------- GGUF

_EXTREMES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]


@FUZZ
@given(data=st.data())
def test_gguf_reader(tiny_gguf_bytes, tmp_path, data):
    """Byte flips, 64-bit extremes written anywhere, truncation and insertion, then the whole read: header,
    config, tokenizer metadata and every tensor's blocks dequantised."""
    raw = bytearray(tiny_gguf_bytes)
    # Most of the structure is in the first few KB (header, metadata, tensor infos): aim there mostly.
    position = st.one_of(st.integers(0, 4096), st.integers(0, len(raw) - 1))
    for _ in range(data.draw(st.integers(0, 4), label="flips")):
        raw[data.draw(position, label="at")] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="extreme"):
        at = data.draw(position, label="extreme at")
        raw[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from(_EXTREMES), label="value"))
    cut = data.draw(st.none() | st.integers(0, len(raw)), label="truncate")
    if cut is not None:
        raw = raw[:cut]
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(bytes(raw))
    try:
        gf = GGUFFile(path)
        gguf_config(gf)
        write_tokenizer_files(gf.tokenizer_metadata(), tmp_path / "tok")
        for _, source in iter_gguf_sources(gf):
            source.read_into(torch.empty(source.shape, dtype=torch.float32))
    except OURS:
        pass
    _within_memory()


# ------------------------------------------------------------------------------------------------ safetensors

_DTYPES = ["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F64", "F8_E4M3", "C64", "F4", "f32", "", 3]
_numbers = st.one_of(st.integers(-3, 40), st.sampled_from(_EXTREMES), st.floats(allow_nan=False, width=32),
                     st.just(True))
_entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(_DTYPES), "shape": st.lists(_numbers, max_size=3),
     "data_offsets": st.lists(_numbers, min_size=0, max_size=3)},
    optional={"extra": st.integers()})
_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=12)


def _tiled(entries: list) -> list:
    """Most fuzzed headers would fail the offset rules at once: tile some entries correctly so the later
    rules (dtypes, shapes, sizes, the reads themselves) are reached too."""
    offset = 0
    for entry in entries:
        shape = [v for v in entry["shape"] if type(v) is int and 0 <= v < 50]
        entry["shape"] = shape
        size = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I64": 8, "BOOL": 1, "F64": 8}.get(entry["dtype"], 1)
        n = size
        for v in shape:
            n *= v
        entry["data_offsets"] = [offset, offset + n]
        offset += n
    return entries


@FUZZ
@given(entries=st.lists(_entry, max_size=4), tile=st.booleans(), names=st.lists(st.text(max_size=6), max_size=4),
       metadata=st.none() | _json, slack=st.integers(-4, 8), raw=st.none() | st.binary(max_size=64),
       pad=st.sampled_from([b"", b"  ", b"\0", b"\n"]))
def test_safetensors_reader_agrees_with_the_library(tmp_path, entries, tile, names, metadata, slack, raw, pad):
    header = dict(zip([n or "t" for n in names], _tiled(entries) if tile else entries))
    if metadata is not None:
        header["__metadata__"] = metadata
    body = raw if raw is not None else json.dumps(header).encode() + pad
    ends = [e["data_offsets"][-1] for e in header.values() if isinstance(e, dict) and e.get("data_offsets")
            and type(e["data_offsets"][-1]) is int and 0 <= e["data_offsets"][-1] < 10**6]
    data = bytes(max(0, max(ends, default=0) + slack))
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    try:
        with safe_open(str(path), framework="pt") as f:
            library = sorted(f.keys())
    except Exception:
        library = None
    try:
        ours = sorted(k for k in read_header(path) if k != "__metadata__")
        for name, source in iter_sources(path):
            source.read_into(torch.empty(source.shape, dtype=torch.float32))
    except CheckpointError as err:
        ours = None
        if library is not None:  # refusing what the library accepts: only for names twice or odd dtypes
            assert "appears twice" in str(err) or "torch cannot hold" in str(err), err
    if ours is not None:
        assert ours == library
    _within_memory()


# ----------------------------------------------------------------------------------------------------- config

_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
           "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
           "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "attention_dropout",
           "pad_token_id", "bos_token_id", "eos_token_id", "dtype", "torch_dtype", "id2label", "label2id",
           "num_labels", "problem_type", "model_type", "architectures", "return_dict", "partial_rotary_factor",
           "to_dict", "validate", "self", "__class__", "_name_or_path", "name_or_path", "max_length", "foo"]
_rope = st.fixed_dictionaries({}, optional={
    "rope_type": st.sampled_from(["default", "linear", "dynamic", "yarn", "longrope", "llama3", "x", 1]),
    "factor": _json_scalars, "rope_theta": _json_scalars, "original_max_position_embeddings": _json_scalars,
    "short_factor": _json, "long_factor": _json, "low_freq_factor": _json_scalars, "partial_rotary_factor": _json_scalars})
_value = st.one_of(_json, _rope, st.sampled_from([0, 1, 2, 4, 8, 64, -1, 10**9, 2**63, 1e-6, float("nan"),
                                                  float("inf"), "bfloat16", "int8", "silu", "float99"]))
_SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _value, max_size=5), base=st.booleans(),
       overrides=st.dictionaries(st.sampled_from(_FIELDS), _value, max_size=2))
def test_config_loader(tmp_path, changes, base, overrides):
    """config.json files and from_pretrained overrides: a config or a ValueError naming the file/field."""
    (tmp_path / "config.json").write_text(json.dumps({**(_SMALL if base else {}), **changes}, default=str))
    try:
        config = Qwen2Config.from_pretrained(tmp_path, **overrides)
    except OURS:
        return
    config = config[0] if isinstance(config, tuple) else config
    Qwen2Config.from_dict(json.loads(config.to_json_string()))  # what loads also saves and loads back


# -------------------------------------------------------------------------------------------- tokenizer files

@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer_files({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                           "tokenizer.ggml.tokens": list(TOKENS), "tokenizer.ggml.token_type": [1] * 62 + [3, 3],
                           "tokenizer.ggml.merges": list(MERGES), "tokenizer.ggml.eos_token_id": 63,
                           "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
                          directory)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


_TOKENIZER_KEYS = ["added_tokens_decoder", "bos_token", "eos_token", "pad_token", "unk_token", "chat_template",
                   "model_max_length", "tokenizer_file", "vocab_file", "merges_file", "extra_special_tokens",
                   "additional_special_tokens", "padding_side", "truncation_side", "split_special_tokens",
                   "clean_up_tokenization_spaces", "errors", "add_prefix_space", "add_bos_token"]
_decoder = st.dictionaries(st.one_of(st.integers(-2, 100).map(str), st.text(max_size=3)),
                           st.one_of(_json, st.fixed_dictionaries({"content": _json_scalars},
                                                                  optional={"special": _json_scalars})), max_size=3)


@FUZZ
@given(file=st.sampled_from(["tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.json",
                             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"]),
       config=st.dictionaries(st.sampled_from(_TOKENIZER_KEYS), st.one_of(_json, _decoder), max_size=3),
       raw=st.none() | st.binary(max_size=40) | st.text(max_size=40).map(str.encode),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3), fast=st.booleans())
def test_tokenizer_file_loaders(tmp_path, tokenizer_files, file, config, raw, flips, fast):
    for name, content in tokenizer_files.items():
        (tmp_path / name).write_bytes(content)
    if file == "tokenizer_config.json" and raw is None:
        current = json.loads(tokenizer_files[file])
        content = json.dumps({**current, **config}).encode()
    else:
        content = bytearray(raw if raw is not None else tokenizer_files.get(file, b"{}"))
        for at, byte in flips:
            if content:
                content[at % len(content)] = byte
        content = bytes(content)
    (tmp_path / file).write_bytes(content)
    cls = Qwen2TokenizerFast if fast else Qwen2Tokenizer
    try:
        tokenizer = cls.from_pretrained(tmp_path)
        tokenizer.decode(tokenizer.encode("ab cz<|im_end|>"))
    except OURS:
        pass
    except jinja2.TemplateError:  # a chat template that does not compile: raised when it is used, as transformers
        pass
    _within_memory()


# ------------------------------------------------------------------------------------------ template rendering

_fragments = st.sampled_from([
    "{% for i in range(N) %}", "{% endfor %}", "{% if x %}", "{% endif %}", "{{ 'ab' * N }}", "{{ N ** N }}",
    "{{ messages|length }}", "{{ m }}", "{% for m in messages %}{{ m.content }}", "{% set ns = namespace(s='a') %}",
    "{% set ns.s = ns.s + ns.s %}", "{{ ns.s|length }}", "{{ 'x'|center(N) }}", "{{ '%Ns' % 'x' }}",
    "{{ '{:>N}'.format('y') }}", "{{ range(N)|join(',') }}", "{{ N / 0 }}", "{{ messages[N] }}", "{{ x.y.z }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}", "{{ f(1) }}", "{{ raise_exception('no') }}", "{{ tools|tojson }}",
    "{{ ''.__class__ }}", "{{ (N|string) * N }}", "{% break %}", "text ", "{{ 'a'|indent(N) }}", "{{ [1] * N }}",
])
_numbers_text = st.sampled_from(["0", "1", "3", "64", "1000", "100000", "10000000", "-5", "2.5", "99999999999"])


@FUZZ
@given(parts=st.lists(st.tuples(_fragments, _numbers_text), max_size=8))
def test_template_rendering(parts):
    """Templates made of loops, big numbers, string growth, recursion, bad operations: they render, or raise
    our errors, or jinja2's own template errors (what transformers' apply_chat_template raises too)."""
    template = "".join(fragment.replace("N", number) for fragment, number in parts)
    try:
        render_conversations(template, [[{"role": "user", "content": "hi"}]], x=1)
    except OURS:
        pass
    except jinja2.TemplateError:
        pass
    _within_memory()
