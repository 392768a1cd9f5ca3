"""A server for the HTTP tests: a tiny random Qwen2 (the real Qwen2.5 tokenizer, so chat templates and tool
calls are the real ones) saved with our save_pretrained, its engine, and uvicorn serving the app on a free
loopback port in a thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import qwen2
from qwen2.serving.app import ServerState, create_app
from qwen2.serving.async_engine import AsyncLLMEngine
from qwen2.serving.engine import EngineConfig, LLMEngine

MODEL_NAME = "tiny-qwen2"
TINY = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
            bos_token_id=151643, eos_token_id=151645)


def save_tiny_model(directory: Path, tokenizer_dir: Path) -> Path:
    """A random tiny model and the real tokenizer files in one directory, as `qwen2 serve --model` reads it."""
    import shutil

    torch.manual_seed(0)
    model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**TINY)).eval()
    with torch.no_grad():  # larger than the default init, so greedy answers depend on the prompt and vary
        for name, weight in model.named_parameters():
            if name.endswith("proj.weight") or name.endswith("lm_head.weight"):
                weight.normal_(0.0, 0.3)
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, directory / path.name)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(default_gguf, tmp_path_factory) -> Path:
    """Import this fixture into a test module to use it (one directory per test session)."""
    from tokenizer_corpus import write_real_tokenizer_files

    tokenizer_dir = write_real_tokenizer_files(default_gguf, tmp_path_factory.getbasetemp() / "qwen2_tokenizer_files")
    return save_tiny_model(tmp_path_factory.mktemp("tiny_serve"), tokenizer_dir)


@dataclass
class RunningServer:
    url: str
    state: ServerState
    server: Any
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the server did not stop"


def start_server(state: ServerState, engine_factory: Any = None) -> RunningServer:
    import uvicorn

    config = uvicorn.Config(create_app(state, engine_factory), host="127.0.0.1", port=0, log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"http://127.0.0.1:{port}", state, server, thread)


def engine_on(model_dir: Path, **config: Any) -> AsyncLLMEngine:
    model = qwen2.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = qwen2.AutoTokenizer.from_pretrained(model_dir)
    options = dict(max_num_seqs=8, max_model_len=512, kv_cache_memory=8 * 2**20)
    options.update(config)
    return AsyncLLMEngine(LLMEngine(model, tokenizer, EngineConfig(**options)))
