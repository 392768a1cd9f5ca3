"""The installed `qwen2` command on the real default model, as a user runs it: a subprocess, and a
pseudo-terminal for `chat`.

Expected text comes from transformers' greedy run on the same GGUF (tests/reference) decoded by transformers'
tokenizer, from transformers' generate() with the hub model's generation config, and from gguf-py's own
reading of the file, never from our output. A .gguf path decodes greedily (no generation config, as in
transformers); the default model, standing in for the hub id, samples by default.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REFERENCE_DIR

pytestmark = pytest.mark.slow

QWEN2 = [str(Path(sys.executable).parent / "qwen2")]  # the console script pip installed
# The bf16 conversion's logits against float32's on the seed answer, relative (measured 0.0025, with every
# next-token choice kept)
CONVERTED_BF16_LOGIT_ERROR = 0.005


def run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*QWEN2, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def greedy_gguf(default_gguf) -> list[str]:
    """The GGUF itself, float32: the setting of transformers' reference run."""
    return ["--model", str(default_gguf), "--greedy", "--dtype", "float32", "--threads", "2"]


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((REFERENCE_DIR / "seed_prompt_greedy.json").read_text())


def reference_text(hf_gguf_tokenizer, reference: dict, n: int) -> str:
    return hf_gguf_tokenizer.decode(reference["new_token_ids"][:n], skip_special_tokens=True)


def test_generate_streams_transformers_greedy_answer(hf_gguf_tokenizer, reference, greedy_gguf):
    prompt = reference["prompt_messages"][0]["content"]
    result = run("generate", prompt, "--max-new-tokens", "24", *greedy_gguf)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == reference_text(hf_gguf_tokenizer, reference, 24).strip()


def test_generate_compiled_gives_the_same_answer(hf_gguf_tokenizer, reference, greedy_gguf):
    """--compile compiles the decode step before answering (said on stderr) and answers as transformers does."""
    prompt = reference["prompt_messages"][0]["content"]
    result = run("generate", prompt, "--max-new-tokens", "24", "--compile", *greedy_gguf)
    assert result.returncode == 0, result.stderr
    assert "Decode step compiled" in result.stderr
    assert result.stdout.strip() == reference_text(hf_gguf_tokenizer, reference, 24).strip()


def test_generate_int8_keeps_the_reference_answer(hf_gguf_tokenizer, reference, greedy_gguf):
    prompt = reference["prompt_messages"][0]["content"]
    result = run("generate", prompt, "--max-new-tokens", "12", "--quantization", "int8", *greedy_gguf)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == reference_text(hf_gguf_tokenizer, reference, 12).strip()


def test_generate_w8a8_is_the_librarys_w8a8_answer(default_gguf, reference, greedy_gguf):
    """`--quantization w8a8` reaches the model: the answer is the library's own W8A8 greedy answer (which
    leaves transformers' after a few tokens here; its fidelity is tested in test_quantization)."""
    import torch

    from qwen2 import AutoTokenizer, Qwen2ForCausalLM

    result = run("generate", reference["prompt_messages"][0]["content"], "--max-new-tokens", "12",
                 "--quantization", "w8a8", *greedy_gguf)
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(str(default_gguf))
    model = Qwen2ForCausalLM.from_pretrained(str(default_gguf), dtype=torch.float32, quantization="w8a8").eval()
    ids = tokenizer.apply_chat_template(reference["prompt_messages"], add_generation_prompt=True,
                                        return_tensors="pt")["input_ids"]
    answer = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert result.stdout.strip() == tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_generate_reads_prompt_from_stdin(hf_gguf_tokenizer, reference, greedy_gguf):
    result = run("generate", "-", "--max-new-tokens", "8", *greedy_gguf, stdin=reference["prompt_messages"][0]["content"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == reference_text(hf_gguf_tokenizer, reference, 8).strip()


def test_info_reports_what_gguf_py_reads(default_gguf):
    import gguf

    reader = gguf.GGUFReader(default_gguf)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    result = run("info")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "tensor types" in line)
    for name, count in types.items():
        assert f"{count} {name}" in line
    assert f"layers: {reader.fields['qwen2.block_count'].contents()}" in result.stdout
    # 630 M parameters for a "0.5B" model: the output head is a tensor of its own in this file (untied).
    total = sum(int(t.n_elements) for t in reader.tensors)
    head = next(int(t.n_elements) for t in reader.tensors if t.name == "output.weight")
    line = next(line for line in result.stdout.splitlines() if "parameters:" in line)
    assert f"{total:,} = {total - head:,} + {head:,} for the output head" in line and "untied" in line


def test_convert_writes_a_directory_transformers_loads(default_gguf, hf_gguf_model, hf_gguf_tokenizer, reference,
                                                      tmp_path):
    """transformers loads the converted directory: its config and tokenizer, and weights that are transformers'
    own float32 reading of the GGUF rounded to bfloat16, tensor for tensor; its logits on the seed prompt and
    transformers' answer stay within bfloat16 weight rounding of the float32 ones."""
    import torch
    import transformers

    from safetensors import safe_open

    out = tmp_path / "converted"
    result = run("convert", str(default_gguf), str(out))
    assert result.returncode == 0, result.stderr
    assert "bfloat16" in result.stdout  # the default, said
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("qwen2", 24, 896)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>"
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # bf16 widened
    weights, expected = converted.state_dict(), hf_gguf_model.state_dict()
    assert weights.keys() == expected.keys()
    for name, value in weights.items():
        assert torch.equal(value, expected[name].to(torch.bfloat16).float()), name
    prompt = tokenizer(reference["rendered_prompt"])["input_ids"]
    assert prompt == hf_gguf_tokenizer(reference["rendered_prompt"])["input_ids"]
    answer = reference["new_token_ids"]
    sequence = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = converted(sequence).logits[0, len(prompt) - 1:-1]
        float32 = hf_gguf_model(sequence).logits[0, len(prompt) - 1:-1]
    error = ((logits - float32).norm() / float32.norm()).item()
    agreement = (logits.argmax(-1) == torch.tensor(answer)).float().mean().item()
    print(f"converted bf16 vs transformers fp32: relative logit error {error:.4f}, agreement {agreement:.3f}")
    assert error < CONVERTED_BF16_LOGIT_ERROR and agreement >= 0.95, (error, agreement)
    del converted
    again = run("convert", str(default_gguf), str(out))
    assert again.returncode == 1 and "convert: error:" in again.stderr and "--overwrite" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "/no/such/model"], "/no/such/model"),
        (["info", "/no/such/file.gguf"], "/no/such/file.gguf"),
        (["generate", "hi", "--threads", "0"], "--threads"),
        (["generate", "hi", "--quantization", "int8", "--group-size", "64"],
         "--group-size applies only with --quantization int4"),
    ],
)
def test_bad_input_gives_one_line_error(args, message):
    result = run(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_seeded_sampling_repeats_and_differs_between_seeds():
    """The issue's example: the sampling options and the seed reach the sampler."""
    answers = [run("generate", "Write a haiku about the sea", "--temperature", "1.5", "--seed", seed,
                   "--max-new-tokens", "12", "--threads", "2") for seed in ("1", "2", "1")]
    assert all(a.returncode == 0 for a in answers), [a.stderr for a in answers]
    assert answers[0].stdout == answers[2].stdout
    assert answers[0].stdout != answers[1].stdout


def _figures(stderr: str) -> dict[str, float]:
    """`--verbose`'s figures in seconds, tokens and tokens/s."""
    figures = {}
    for name, value, unit in re.findall(r"^([a-z ]+):\s+([\d.]+)\s*(ms|s|token\(s\)|tokens/s)$", stderr, re.M):
        figures[name] = float(value) / 1000 if unit == "ms" else float(value)
    return figures


def test_greedy_is_transformers_generate_with_the_hub_config_and_verbose_figures(hf_gguf_model,
                                                                                  hf_gguf_tokenizer, reference):
    """`--greedy` on the default model is generate(do_sample=False) under the hub model's generation config
    (its repetition penalty applies to greedy decoding too): transformers' generate() with that config is the
    oracle. `--verbose` prints ollama's figures: the counts are the prompt's and the answer's, the rates their
    quotients."""
    import transformers

    from qwen2.loading.default_model import default_model_dir

    result = run("generate", reference["prompt_messages"][0]["content"], "--greedy", "--dtype", "float32",
                 "--threads", "2", "--max-new-tokens", "16", "--verbose")
    assert result.returncode == 0, result.stderr
    ids = hf_gguf_tokenizer.apply_chat_template(reference["prompt_messages"], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
    config = transformers.GenerationConfig.from_pretrained(default_model_dir())
    new = hf_gguf_model.generate(ids, generation_config=config, do_sample=False, max_new_tokens=16)[0, ids.shape[1]:]
    assert result.stdout.strip() == hf_gguf_tokenizer.decode(new, skip_special_tokens=True).strip()

    figures = _figures(result.stderr)
    assert figures["prompt eval count"] == ids.shape[1]
    assert figures["eval count"] == len(new) == 16
    assert figures["time to first token"] == figures["prompt eval duration"] > 0
    assert figures["prompt eval rate"] == pytest.approx(ids.shape[1] / figures["prompt eval duration"], rel=0.02)
    assert figures["eval rate"] == pytest.approx(15 / figures["eval duration"], rel=0.02)
    assert figures["total duration"] == pytest.approx(figures["prompt eval duration"] + figures["eval duration"],
                                                      rel=0.02)
    assert 0 < figures["load duration"] < 300 and 0.1 < figures["eval rate"] < 10_000


def test_truncated_gguf_is_refused(default_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    with open(default_gguf, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(4_000_000))
    result = run("generate", "hi", "--model", str(broken))
    assert result.returncode == 1
    assert "broken.gguf" in result.stderr and "Traceback" not in result.stderr


def test_unknown_option_and_dtype_are_usage_errors():
    assert run("generate", "hi", "--no-such-flag").returncode == 2
    result = run("generate", "hi", "--dtype", "float8")
    assert result.returncode == 2 and "float8" in result.stderr


SECRET = "4817"  # in no answer the model could give without the conversation
QUESTION = "What number did I ask you to remember? Answer with the number only."


def _answer(before: str, question: str) -> str:
    """The answer a chat turn printed: what followed the terminal's echo of the question."""
    assert question in before
    return before.split(question, 1)[1]


def test_chat_repl_multi_turn_reset_interrupt_and_exit(hf_gguf_tokenizer, reference, greedy_gguf, tmp_path):
    """Eager (--no-compile): the compiled step in a chat, across turns, is test_cli_repl's business on a tiny
    model; compiling the real one here would add ~40 s of CI for nothing this test checks."""
    import pexpect
    # Ctrl-C as a terminal delivers it, also where the test runner was started with SIGINT ignored (nohup, &)
    child = pexpect.spawn(QWEN2[0], [*QWEN2[1:], "chat", *greedy_gguf, "--max-new-tokens", "40", "--no-compile"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb", "XDG_STATE_HOME": str(tmp_path)},
                          encoding="utf-8", timeout=240,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect(">>> ")
        child.sendline(reference["prompt_messages"][0]["content"])
        child.expect(">>> ")
        assert reference_text(hf_gguf_tokenizer, reference, 12).strip() in child.before
        # A later turn sees the earlier ones: asked for a number given only in an earlier turn, the model
        # (greedy) answers it; after /reset the same question cannot be answered with it.
        child.sendline(f"Remember this number: {SECRET}. Reply with OK.")
        child.expect(">>> ")
        child.sendline(QUESTION)
        child.expect(">>> ")
        assert SECRET in _answer(child.before, QUESTION)
        child.sendline("/reset")
        child.expect(r"\(history cleared\)")
        child.expect(">>> ")
        child.sendline(QUESTION)
        child.expect(">>> ")
        assert SECRET not in _answer(child.before, QUESTION)
        # Ctrl-C while an answer streams stops that answer, and the session goes on.
        child.sendline("Count from 1 to 500, one number per line.")
        child.expect(r"per line\.\r\n")  # the terminal's echo of the question: its digits are not the answer's
        child.expect(r"\d")
        child.sendintr()
        child.expect(r"\(stopped\)")
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_console_script_is_installed():
    assert shutil.which("qwen2", path=str(Path(sys.executable).parent)) is not None


def test_convert_overwrite_never_deletes_foreign_files(default_gguf, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    result = run("convert", str(default_gguf), str(tmp_path), "--overwrite")
    assert result.returncode == 1 and "notes.txt" in result.stderr
    assert precious.read_text() == "mine"
