"""LLMEngine: the synchronous serving loop. Requests are added and aborted between steps; each `step()` runs
one scheduled batch (decode rows first, then prefill chunks) on the paged KV cache and returns the outputs
of the requests that advanced. AsyncLLMEngine runs this loop on a thread; `LLM` wraps it for offline use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen2.serving.outputs import RequestOutput
from qwen2.serving.params import SamplingParams


@dataclass
class EngineConfig:
    """Limits of one engine. `kv_cache_memory` is bytes (int) or a fraction (0-1] of the memory available
    now; None takes a default fraction. `max_model_len` None is the model's `max_position_embeddings`."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | float | None = None
    enable_prefix_caching: bool = True


@dataclass
class EngineStats:
    """Counters for /metrics and tests. Prefix-cache queries and hits count prompt tokens."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int


class LLMEngine:
    """The synchronous core. Not thread-safe: one thread calls add_request/abort_request/step."""

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, model: str, *, quantization: str | None = None, dtype: Any = None,
                        **engine_config: Any) -> LLMEngine:
        """Load a model (hub id, directory or GGUF file) and its tokenizer, then build an engine on them."""
        raise NotImplementedError

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    deadline: float | None = None, prompt: str | None = None) -> None:
        """Queue a request. `deadline` is a time.time() after which it finishes with reason "timeout".
        Raises QueueFullError, ContextLengthExceededError, or ValueError for a duplicate id / empty prompt."""
        raise NotImplementedError

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and return its KV blocks to the pool; unknown or finished ids are ignored."""
        raise NotImplementedError

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return a snapshot of every request that advanced or finished."""
        raise NotImplementedError

    def has_unfinished_requests(self) -> bool:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError
