"""`qwen2 serve` as a user runs it: a subprocess on a tiny model on a free loopback port. It answers 503 or 200
on /health from the start, serves with an API key, logs one line per request, and on SIGTERM stops accepting
connections, lets the running stream finish (ending in [DONE]) and exits. A model that cannot load ends
the process with status 1 and the reason."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_harness import tiny_dir  # noqa: F401 (a fixture)


SRC = Path(__file__).resolve().parents[2] / "src"


class _Serve:
    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.process = subprocess.Popen([sys.executable, "-m", "qwen2.cli", "serve", "--port", "0", *args],
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            self.lines.append(line)

    def url(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
                if match:
                    return match.group(1)
            assert self.process.poll() is None, "".join(self.lines)
            time.sleep(0.05)
        raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)



def test_serve_api_key_log_lines_and_graceful_sigterm(tiny_dir):
    serve = _Serve("--model", str(tiny_dir), "--dtype", "float32", "--served-model-name", "tiny", "--api-key", "k",
                   "--max-model-len", "1024", "--kv-cache-memory", "16MiB", "--shutdown-grace", "60")
    try:
        url = serve.url()
        assert httpx.get(url + "/health").status_code in (200, 503)  # 503 until the engine has loaded
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        headers = {"Authorization": "Bearer k"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 150,
                "ignore_eos": True, "stream": True}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=120) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(lines)
            serve.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no new connections once stopping
                httpx.get(url + "/health")
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the running stream was let finish
        assert '"finish_reason":"length"' in rest[-2].replace(" ", "")
        # uvicorn re-raises the signal once shut down, so the status is the conventional "ended by SIGTERM"
        assert serve.process.wait(timeout=60) == -signal.SIGTERM
        serve.reader.join(timeout=10)
        logged = [line for line in serve.lines if "POST /v1/chat/completions" in line]
        assert any(" 401 " in line for line in logged)
        assert any(" 200 in=" in line and "out=150" in line and "ttft=" in line for line in logged), logged
    finally:
        serve.stop()


def test_serve_exits_1_when_the_model_cannot_load(tmp_path):
    serve = _Serve("--model", str(tmp_path / "missing"))
    try:
        assert serve.process.wait(timeout=120) == 1
        serve.reader.join(timeout=10)
        assert "qwen2 serve: error:" in "".join(serve.lines)
    finally:
        serve.stop()


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "prometheus_client"])
def test_serve_without_the_extra_names_the_pip_command(monkeypatch, capsys, missing):
    from qwen2.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "qwen2.serving.app", raising=False)
    assert main(["serve", "--port", "0"]) == 1
    error = capsys.readouterr().err
    assert 'pip install "qwen2[serve]"' in error and missing in error


def test_serve_step_budget_reaches_the_engine(tiny_dir):
    import asyncio

    from qwen2.cli.main import build_parser
    from qwen2.serving.cli import _engine_factory

    common = ["serve", "--model", str(tiny_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB",
              "--max-num-seqs", "4"]
    engine = _engine_factory(build_parser().parse_args([*common, "--max-num-batched-tokens", "48"]))()
    try:
        scheduler = engine.engine.scheduler
        assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (4, 48)
    finally:
        asyncio.run(engine.shutdown(0))
    with pytest.raises(ValueError, match="max_num_batched_tokens >= max_num_seqs"):  # a step must fit every row
        _engine_factory(build_parser().parse_args([*common, "--max-num-batched-tokens", "2"]))()
