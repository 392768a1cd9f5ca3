"""AsyncLLMEngine: the LLMEngine loop on its own thread, with asyncio iterators of each request's outputs.
The event loop never blocks on the model: requests cross to the thread through a queue, outputs come back
through `loop.call_soon_threadsafe`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from qwen2.serving.engine import EngineStats, LLMEngine
from qwen2.serving.outputs import RequestOutput
from qwen2.serving.params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        raise NotImplementedError

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       deadline: float | None = None, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield snapshots as the request advances, the last with finished=True. Raises QueueFullError or
        ContextLengthExceededError before the first yield; stopping the iteration (client gone) aborts it."""
        raise NotImplementedError
        yield  # pragma: no cover

    async def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop admitting requests, let running ones finish for up to `grace_seconds`, abort the rest, and
        stop the thread."""
        raise NotImplementedError
