"""The `qwen2` command on bad input (issue 20): one line on stderr and exit status 1 for every user error,
never a traceback; `--threads` above the cores is clamped with a message. Tiny crafted models, so these
run in seconds; most call `main()` in-process, a few run the real console entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from qwen2.cli import main
from test_gguf import write_tiny_gguf


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture
def tiny_dir(tmp_path, tiny_gguf) -> Path:
    """A transformers-layout directory (config, tokenizer, safetensors) converted from the tiny GGUF."""
    out = tmp_path / "model"
    assert main(["convert", str(tiny_gguf), str(out), "--dtype", "float32"]) == 0
    return out


def _error_line(err: str) -> str:
    """The one error line of a stderr that may also hold progress bars (first-use conversion)."""
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0]), err
    return errors[0]


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    return _error_line(capsys.readouterr().err)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("model,message", [
    ("/dev/null", "neither a directory nor a regular file"),
    ("/nonexistent/dir", "does not exist"),
    ("{tmp}/empty.gguf", "empty.gguf"),
])
def test_bad_model_paths(capsys, tmp_path, model, message):
    (tmp_path / "empty.gguf").write_bytes(b"")
    err = _one_line_error(capsys, ["generate", "--model", model.format(tmp=tmp_path), "hi"])
    assert message in err


@pytest.mark.parametrize("change,words", [
    ({"rms_norm_eps": "tiny"}, ["config.json", "rms_norm_eps"]),
    ({"tie_word_embeddings": "no"}, ["config.json", "tie_word_embeddings"]),
    ({"dtype": "int8"}, ["config.json", "floating-point"]),
    ({"pad_token_id": 10**6}, ["config.json", "pad_token_id"]),
    ({"num_hidden_layers": 1000, "layer_types": None}, ["num_hidden_layers=1,000", "2 layer"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, ["config.json", "rope_theta"]),
])
def test_bad_config_values_are_one_line(capsys, tiny_dir, change, words):
    _edit_json(tiny_dir / "config.json", **change)
    err = _one_line_error(capsys, ["generate", "--model", str(tiny_dir), "--raw", "--max-new-tokens", "2", "ab"])
    assert all(word in err for word in words), err


@pytest.mark.parametrize("corrupt,words", [
    (lambda d: (d / "model.safetensors").write_bytes(os.urandom(64)), ["model.safetensors"]),
    (lambda d: (d / "tokenizer_config.json").write_text("[1]"), ["tokenizer_config.json"]),
    (lambda d: _edit_json(d / "tokenizer_config.json", tokenizer_file="/etc/hostname"),
     ["tokenizer_file", "outside the model directory"]),
    (lambda d: _edit_json(d / "tokenizer_config.json", chat_template="{{ 'a' * 10000000000 }}"), ["chat template"]),
    (lambda d: _edit_json(d / "tokenizer_config.json",
                          chat_template="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                        "{% endfor %}"), ["chat template", "runaway"]),
])
def test_bad_files_are_one_line(capsys, tiny_dir, corrupt, words):
    corrupt(tiny_dir)
    err = _one_line_error(capsys, ["generate", "--model", str(tiny_dir), "--max-new-tokens", "2", "ab"])
    assert all(word in err for word in words), err


@pytest.mark.parametrize("option,value,message", [("--threads", "0", "--threads must be at least 1"),
                                                  ("--threads", "-3", "--threads must be at least 1"),
                                                  ("--temperature", "inf", "temperature")])
def test_bad_options_are_one_line(capsys, tiny_gguf, option, value, message):
    err = _one_line_error(capsys, ["generate", "--model", str(tiny_gguf), "--raw", "--max-new-tokens", "2",
                                   option, value, "ab"])
    assert message in err


@pytest.mark.parametrize("option,value", [("--top-p", "7"), ("--min-p", "5"), ("--temperature", "-1")])
def test_bad_sampling_options_are_usage_errors(capsys, tiny_gguf, option, value):
    """Refused while parsing, before any model is loaded: generate's usage and one error line naming the option."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tiny_gguf), "--raw", option, value, "ab"])
    assert exit_.value.code == 2
    assert option in _error_line(capsys.readouterr().err)


def _run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2.cli", *args], input=stdin, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_threads_above_the_cores_are_clamped_with_a_message(tiny_gguf):
    cores = len(os.sched_getaffinity(0))
    done = _run("generate", "--model", str(tiny_gguf), "--raw", "--greedy", "--max-new-tokens", "2",
                "--threads", "1000", "ab")
    assert done.returncode == 0, done.stderr
    assert f"--threads 1000 is more than the {cores} core(s) available; using {cores}" in done.stderr.decode()


@pytest.mark.parametrize("data", [b"\xff\xfe hello", b"ab\xc3", "é".encode("latin-1")])
def test_non_utf8_standard_input_is_one_line(tiny_gguf, data):
    done = _run("generate", "--model", str(tiny_gguf), "--raw", "--max-new-tokens", "2", "-", stdin=data)
    assert done.returncode == 1
    assert "standard input is not UTF-8" in _error_line(done.stderr.decode())
