"""`qwen2 serve --tensor-parallel-size 2` as a user runs it: the launcher starts two ranks (gloo on loopback),
rank 0 serves HTTP and schedules, both step in lockstep. Answers to concurrent greedy requests from the
`openai` client (prompt logprobs too) equal the single-process engine's on the same checkpoint, and SIGTERM
shuts the whole job down."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))  # the shared tiny served model
from server_harness import tiny_dir  # noqa: E402,F401 (a fixture)

from qwen2 import SamplingParams  # noqa: E402
from qwen2.serving.llm import LLM  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
PROMPTS = ["def fibonacci(n):", "The capital of France is", "1, 2, 3, 5, 8,", "import numpy as np\n"]


def _start(model_dir: Path) -> tuple[subprocess.Popen, list[str]]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "qwen2.cli", "serve", "--port", "0", "--model", str(model_dir),
                                "--dtype", "float32", "--served-model-name", "tiny", "--tensor-parallel-size", "2",
                                "--threads", "1", "--kv-cache-memory", "64MiB"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, lines


def _url(process: subprocess.Popen, lines: list[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if match := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                return match.group(1)
        assert process.poll() is None, "".join(lines)
        time.sleep(0.05)
    raise AssertionError("the server did not start:\n" + "".join(lines))


def _wait_loaded(url: str, process: subprocess.Popen, lines: list[str], timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(url + "/health").status_code != 200:
        assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)


def test_tensor_parallel_server_answers_as_one_process(tiny_dir):
    import openai

    process, lines = _start(tiny_dir)
    try:
        single = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=64 * 2**20)
        expected = single.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, logprobs=0,
                                                           prompt_logprobs=0), use_tqdm=False)
        url = _url(process, lines)
        _wait_loaded(url, process, lines)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(prompt: str):  # echo + logprobs: the prompt's logprobs too (the head over every prompt row)
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0.0,
                                             echo=True, logprobs=0)

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched steps over both ranks
            answers = list(pool.map(ask, PROMPTS))
        for prompt, answer, reference in zip(PROMPTS, answers, expected):
            out = reference.outputs[0]
            assert answer.choices[0].text == prompt + out.text
            logprobs = [None] + [entry[token].logprob for entry, token in
                                 zip(reference.prompt_logprobs[1:], reference.prompt_token_ids[1:])]
            logprobs += [entry[token].logprob for entry, token in zip(out.logprobs, out.token_ids)]
            assert answer.choices[0].logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-4)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM, "".join(lines)  # as one process ends
        assert "error" not in "".join(lines)  # rank 1 was released, not cut off
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
