"""Hostile and broken tokenizer directories (issue 20), built tiny from the tiny GGUF's vocabulary: files a
config names outside the directory, ids past the vocabulary (transformers is the oracle), and files of the
wrong shape or encoding, each a `TokenizerFileError` naming the file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import transformers

from qwen2.tokenizer import Qwen2Tokenizer, Qwen2TokenizerFast, TokenizerFileError
from qwen2.tokenizer.gguf import write_tokenizer_files
from test_gguf import MERGES, TOKENS

CLASSES = (Qwen2Tokenizer, Qwen2TokenizerFast)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    directory = tmp_path / "model"
    write_tokenizer_files({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                           "tokenizer.ggml.tokens": list(TOKENS), "tokenizer.ggml.token_type": [1] * 62 + [3, 3],
                           "tokenizer.ggml.merges": list(MERGES), "tokenizer.ggml.eos_token_id": 63}, directory)
    return directory


def _config(directory: Path, **changes) -> None:
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def planted(tmp_path, tiny_dir) -> Path:
    """A different vocabulary outside the model directory: reading it would change what `ab` encodes to."""
    outside = tmp_path / "outside"
    outside.mkdir()
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    data["model"]["vocab"] = {token: 63 - i for token, i in data["model"]["vocab"].items()}
    (outside / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(tiny_dir / "vocab.json", outside / "vocab.json")
    shutil.copy(tiny_dir / "merges.txt", outside / "merges.txt")
    return outside


@pytest.mark.parametrize("key,name", [
    ("tokenizer_file", "{outside}/tokenizer.json"), ("tokenizer_file", "../outside/tokenizer.json"),
    ("vocab_file", "{outside}/vocab.json"), ("merges_file", "../outside/merges.txt"),
    ("tokenizer_file", "sub/../../outside/tokenizer.json"), ("tokenizer_file", ".."),
])
def test_files_named_by_the_config_must_stay_inside(tiny_dir, planted, key, name):
    _config(tiny_dir, **{key: name.format(outside=planted)})
    for cls in CLASSES:
        with pytest.raises(TokenizerFileError, match=f"tokenizer_config.json: {key}.*outside the model directory"):
            cls.from_pretrained(tiny_dir)


@pytest.mark.parametrize("changes", [{"tokenizer_file": "tokenizer.json"}, {"tokenizer_file": None},
                                     {"vocab_file": "./vocab.json", "merges_file": "merges.txt"}])
def test_files_named_inside_still_load(tiny_dir, changes):
    reference = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    _config(tiny_dir, **changes)
    for cls in CLASSES:
        assert cls.from_pretrained(tiny_dir).encode("abcz yx") == reference.encode("abcz yx")


@pytest.mark.parametrize("index", [65, 1000, 10**9])
def test_added_token_id_past_the_vocabulary_loads_as_transformers_does(tiny_dir, caplog, index):
    """This raised NameError (no `logger` in vocabulary.py); the token takes the next id, as in transformers."""
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(index)] = {"content": "<far>", "special": True}
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(config))
    reference = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    for cls in CLASSES:
        with caplog.at_level(logging.WARNING):
            tokenizer = cls.from_pretrained(tiny_dir)
        assert f"listed with id {index}" in caplog.text
        assert tokenizer.encode("ab<far>c") == reference.encode("ab<far>c")
        assert len(tokenizer) == len(reference)


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer_config.json", "[1, 2]", "expected a JSON object, found list"),
    ("tokenizer_config.json", "[" * 100_000, "not valid JSON"),
    ("tokenizer_config.json", b'{"bos_token": "\xff"}', "not valid JSON"),
    ("chat_template.jinja", b"{{ '\xff\xfe' }}", "chat_template.jinja: not UTF-8"),
    ("merges.txt", b"#version: 0.2\n\xff \xfe\n", "merges.txt: not UTF-8"),
])
def test_broken_files_name_the_file(tiny_dir, name, content, message):
    (tiny_dir / "tokenizer.json").unlink()  # so vocab.json + merges.txt are read by both classes
    path = tiny_dir / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for cls in CLASSES:
        with pytest.raises(TokenizerFileError, match=message):
            cls.from_pretrained(tiny_dir)


@pytest.mark.parametrize("name,content", [("special_tokens_map.json", "[1]"), ("added_tokens.json", '"x"')])
def test_legacy_side_files_of_the_wrong_shape(tiny_dir, name, content):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]  # the side files count only then
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (tiny_dir / name).write_text(content)
    for cls in CLASSES:
        with pytest.raises(TokenizerFileError, match=f"{name}: expected a JSON object"):
            cls.from_pretrained(tiny_dir)


@pytest.mark.parametrize("merges,message", [({"a": "b"}, "must be a list"), ([["a", 1]], r"merges\[0\]"),
                                            (["a b c"], r"merges\[0\]")])
def test_tokenizer_json_merges_of_the_wrong_shape(tiny_dir, merges, message):
    for name in ("vocab.json", "merges.txt"):
        (tiny_dir / name).unlink()
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    data["model"]["merges"] = merges
    (tiny_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerFileError, match=message):
        Qwen2Tokenizer.from_pretrained(tiny_dir)
