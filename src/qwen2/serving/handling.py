"""What the chat and completions routes share: sampling parameters from the request's fields, checks that need
the tokenizer, starting an engine request (so its errors become statuses before any byte is sent), collecting it
while watching for the client to leave, and server-sent events whose generator is closed the moment the client
disconnects (closing it aborts the engine request and frees its KV blocks)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Awaitable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qwen2.serving.async_engine import AsyncLLMEngine
from qwen2.serving.http_errors import APIError, to_api_error
from qwen2.serving.logprobs import TokenText
from qwen2.serving.metrics import RequestRecord
from qwen2.serving.outputs import RequestOutput
from qwen2.serving.errors import ConstraintError
from qwen2.serving.params import SamplingParams, StructuredOutputsParams
from qwen2.serving.protocol import _Sampling

T = TypeVar("T")


@dataclass
class Served:
    """The loaded engine and what the handlers need beside it."""

    engine: AsyncLLMEngine
    model_name: str
    tokenizer: Any = field(init=False)
    vocab_size: int = field(init=False)
    max_model_len: int = field(init=False)
    token_text: TokenText = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer = self.engine.engine.tokenizer
        self.vocab_size = len(self.tokenizer)
        self.max_model_len = self.engine.engine.max_model_len
        self.token_text = TokenText(self.tokenizer)


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is not in the vocabulary (size {vocab_size})", param=param)


def sampling_params(request: _Sampling, *, max_tokens: int | None, vocab_size: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None,
                    structured: StructuredOutputsParams | None = None) -> SamplingParams:
    """The engine's SamplingParams for a request; OpenAI's defaults where the request is silent."""
    bias: dict[int, float] | None = None
    if request.logit_bias is not None:
        bias = {}
        for key, value in request.logit_bias.items():
            if not key.isdigit():
                raise APIError(400, f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias")
            bias[int(key)] = value
        check_token_ids(list(bias), vocab_size, "logit_bias")
    check_token_ids(request.stop_token_ids or [], vocab_size, "stop_token_ids")
    fields = {
        "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k, "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty, "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
    }
    try:
        return SamplingParams(
            n=request.n, seed=request.seed, stop=request.stop_strings(), stop_token_ids=request.stop_token_ids or [],
            ignore_eos=request.ignore_eos, max_tokens=max_tokens, min_tokens=request.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, logit_bias=bias, skip_special_tokens=request.skip_special_tokens,
            structured_outputs=structured,
            **{name: value for name, value in fields.items() if value is not None},
        )
    except ValueError as error:  # combinations SamplingParams checks (min_tokens > max_tokens, ...)
        field = str(error).split(" ", 1)[0]
        raise APIError(400, str(error), param=field if field in SamplingParams.__dataclass_fields__ else None)


async def start(engine: AsyncLLMEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                record: RequestRecord, *, prompt: str | None = None, prompt_param: str = "messages",
                constraint_param: str | None = None) -> AsyncIterator[RequestOutput]:
    """Submit a request and wait for its first output, so queue-full, context-length and grammar errors
    surface here, before any byte of the response; returns the request's outputs from that first one on.
    `constraint_param` names the field a structured_outputs grammar came from."""
    record.prompt_tokens = len(prompt_ids)
    stream = engine.generate(request_id, prompt_ids, params, prompt=prompt)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without output", type="internal_server_error")
    except ConstraintError as error:
        field = constraint_param or "structured_outputs"
        raise APIError(400, f"{field}: {error.reason}", param=field) from error
    except Exception as error:
        raise to_api_error(error, param=prompt_param) from error
    note(record, first)
    return _chain(first, stream)


def note(record: RequestRecord, output: RequestOutput) -> None:
    """Copy an output's token counts and timings into the request's record."""
    record.completion_tokens = sum(len(choice.token_ids) for choice in output.outputs)
    if output.metrics.first_token_time is not None and record.first_token is None:
        record.first_token = output.metrics.first_token_time
    if output.finished:
        record.finished = output.metrics.finished_time or time.time()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """The result of `work`, or None if the client left first: `work` is then cancelled, which closes the
    engine streams it iterates (their engine requests are aborted)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def _chain(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """The first output, then the rest; closing this closes the engine stream (aborting its request)."""
    try:
        yield first
        async for output in stream:
            yield output
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) from several streams as they come; closing this closes them all."""
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
            await queue.put(None)
        except Exception as error:
            await queue.put(error)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def event_stream(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """SSE frames of the events, then `[DONE]`; an engine failure mid-stream becomes an error event."""
    try:
        async for event in events:
            yield sse(event)
    except Exception as error:  # headers are sent: the error can only travel in the stream
        yield sse(to_api_error(error).body())
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    yield DONE


class EventStreamResponse(StreamingResponse):
    """An SSE response that listens for the client's disconnect whatever the ASGI version, and closes its
    generator then (starlette, under ASGI 2.4, only notices on the next failed send)."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client went away between two frames
                pass

        streamer = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streamer, watcher):
                task.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
