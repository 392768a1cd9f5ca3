"""`qwen2 chat` as a user drives it, on a tiny random model with the default model's tokenizer (seconds, not
minutes): the installed command, fed through a pipe and through a pseudo-terminal (pexpect).

The model's answers are noise; what is checked is the REPL: its commands, what reaches the model (the prompt
token counts `--verbose` prints, against transformers' tokenizer and chat template on the same files), the
saved conversation, and the readline history across sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

QWEN2 = str(Path(sys.executable).parent / "qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_gguf) -> Path:
    """A 2-layer random Qwen2 with the default model's tokenizer files, saved as a transformers directory."""
    from qwen2 import Qwen2Config, Qwen2ForCausalLM
    from qwen2.loading.hub import resolve_model_dir

    tokenizer_dir = resolve_model_dir(default_gguf)
    out = tmp_path_factory.mktemp("tiny-chat")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    config = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=151643, eos_token_id=151645,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture()
def home(tmp_path) -> dict[str, str]:
    """The environment of a user whose home is a fresh directory (no history yet)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("XDG_")}
    (tmp_path / "home").mkdir()
    return {**env, "HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "TERM": "dumb"}


def chat_args(tiny_dir: Path, *extra: str) -> list[str]:
    return ["chat", "--model", str(tiny_dir), "--no-compile", "--threads", "1", *extra]


def prompt_counts(stderr: str) -> list[int]:
    return [int(n) for n in re.findall(r"^prompt eval count:\s+(\d+) token", stderr, re.MULTILINE)]


def test_chat_commands_through_a_pipe(tiny_dir, home, tmp_path):
    import transformers

    conv, empty, again = tmp_path / "conv.json", tmp_path / "empty.json", tmp_path / "again.json"
    script = "\n".join([
        "/help",
        "/set temperature 0.2", "/set top-p 2", "/set top_k 5", "/set min-p 0.1", "/set repetition-penalty 1.3",
        "/set seed 7", "/set max-new-tokens 3", "/set warmth 3",
        "/show",
        "/nonsense arg",
        '"""first line', "second line", 'third"""',
        "/system Be terse.",
        f"/save {conv}",
        "/reset",
        f"/save {empty}",
        f"/load {conv}",
        f"/save {again}",
        "next",
        f"/load {tmp_path / 'missing.json'}",
        "/exit",
        "never read",
    ]) + "\n"
    result = subprocess.run([QWEN2, *chat_args(tiny_dir, "--verbose")], input=script, capture_output=True,
                            text=True, timeout=120, env=home)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for command in ("/help", "/set NAME VALUE", "/show", "/system TEXT", "/save FILE", "/load FILE", "/reset",
                    "/exit"):
        assert command in out
    assert "top_p must be in (0, 1], got 2" in out and "usage: /set NAME VALUE" in out
    shown = next(line for line in out.splitlines() if "sampling:" in line)
    for setting in ("temperature 0.2", "top_k 5", "min_p 0.1", "repetition_penalty 1.3", "seed 7",
                    "max_new_tokens 3"):
        assert setting in shown
    assert "Unknown command '/nonsense'" in out
    assert out.index("Unknown command") < out.index("/set NAME VALUE", out.index("Unknown command"))
    assert "missing.json" in out  # the error names the file; the session goes on

    saved = json.loads(conv.read_text())
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[:2] == [{"role": "system", "content": "Be terse."},
                         {"role": "user", "content": "first line\nsecond line\nthird"}]
    assert json.loads(empty.read_text()) == saved[:1]
    assert json.loads(again.read_text()) == saved

    # Two answers reached the model (the unknown command did not): the multi-line message alone, then the
    # loaded conversation plus "next". The prompt sizes are transformers' on the same tokenizer files.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    expected = [len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
                for messages in (saved[1:2], saved + [{"role": "user", "content": "next"}])]
    assert prompt_counts(result.stderr) == expected
    assert re.findall(r"^eval count:\s+(\d+) token", result.stderr, re.MULTILINE) == ["3", "3"]


def test_load_refuses_what_is_not_a_conversation(tiny_dir, home, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "wizard", "content": "x"}]))
    (tmp_path / "broken.json").write_text("{")
    script = f"/load {tmp_path / 'bad.json'}\n/load {tmp_path / 'broken.json'}\n/save {tmp_path / 's.json'}\n"
    result = subprocess.run([QWEN2, *chat_args(tiny_dir)], input=script, capture_output=True, text=True,
                            timeout=120, env=home)
    assert result.returncode == 0, result.stderr
    assert "must hold a JSON list of messages" in result.stdout and "is not JSON" in result.stdout
    assert json.loads((tmp_path / "s.json").read_text()) == []


@contextlib.contextmanager
def _left_with_exit(child):
    """The spawned chat, left with `/exit` at the end of the block (and closed whatever happens there), which
    must end it with status 0."""
    import pexpect

    try:
        yield child
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_history_and_multiline_on_a_terminal(tiny_dir, home):
    """readline keeps the history across sessions (in $HOME/.local/state/qwen2/history); Ctrl-P recalls the
    previous session's last line. A message between \"\"\" marks spans lines on a terminal too."""
    import pexpect

    def spawn() -> pexpect.spawn:
        child = pexpect.spawn(QWEN2, chat_args(tiny_dir, "--max-new-tokens", "2"), env=home, encoding="utf-8",
                              timeout=60)
        child.expect(">>> ")
        return child

    child = spawn()
    try:
        child.sendline('"""one')
        child.expect(r"\.\.\. ")
        child.sendline('two"""')
        child.expect(">>> ")
        child.sendline(f"/save {home['HOME']}/conv.json")
        child.expect("Saved 2 messages")
        child.expect(">>> ")
        child.sendline("/set temperature 0.25")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert json.loads((Path(home["HOME"]) / "conv.json").read_text())[0] == {"role": "user", "content": "one\ntwo"}
    history = Path(home["HOME"]) / ".local" / "state" / "qwen2" / "history"
    assert "/set temperature 0.25" in history.read_text()

    with _left_with_exit(spawn()) as child:
        child.send("\x10\r")  # Ctrl-P, Enter: the last line of the previous session, run again
        child.expect("Set temperature to 0.25")
        child.expect(">>> ")


def test_chat_compiles_in_the_background_and_keeps_the_compiled_step(tiny_dir, home, tmp_path):
    """The prompt comes before the compiled step; answers go on (eagerly) while a background process compiles
    it, then use it. The compiled step is written to qwen2's cache on the first start; the next start loads it
    and compiles nothing (no process is started: its log is not rewritten) and decodes with it. (Its speed is
    a benchmark's business, not a test's.)"""
    import pexpect

    env = {**home, "QWEN2_CACHE": str(tmp_path / "cache")}
    # Inductor's kernels where the test session keeps them (warm across runs); qwen2's own cache is fresh.
    env["TORCHINDUCTOR_CACHE_DIR"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(
        Path(tempfile.gettempdir()) / "qwen2-test-inductor")

    def session(first_status: str) -> str:
        spawned = pexpect.spawn(QWEN2, ["chat", "--model", str(tiny_dir), "--threads", "1", "--max-new-tokens", "2",
                                        "-v"], env=env, encoding="utf-8", timeout=300)
        with _left_with_exit(spawned) as child:
            child.expect(">>> ")
            child.sendline("/show")
            child.expect(rf"decode step: {first_status}")
            child.expect(">>> ")
            child.sendline("hello")  # answered at once (eagerly, or already compiled on a second start)
            child.expect("eval count:")
            child.expect(">>> ")
            status = ""
            while not status.startswith("compiled"):
                time.sleep(1)
                child.sendline("/show")
                child.expect(r"decode step: ([^\r\n]*)")
                status = child.match.group(1)
                child.expect(">>> ")
                assert re.match(f"compiled|{first_status}", status), status
            child.sendline("hello again")  # through the compiled step
            child.expect("eval count:")
            child.expect(">>> ")
            child.sendline("/show")
            child.expect(r"; (\d+) token\(s\) decoded with it")
            assert int(child.match.group(1)) >= 1
            child.expect(">>> ")
        return status

    first = session("compiling in a background process")
    assert "built in a background process" in first
    files = list((tmp_path / "cache" / "compile").glob("decode-step-*.bin"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    written, logged = files[0].stat().st_mtime_ns, files[0].with_suffix(".log").stat().st_mtime_ns
    assert "loaded from the cache" in session("(loading the saved compiled step|compiled)")
    assert files[0].stat().st_mtime_ns == written  # reused, not rewritten
    assert files[0].with_suffix(".log").stat().st_mtime_ns == logged  # no compiling process this time
