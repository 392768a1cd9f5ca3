"""POST /v1/completions: the legacy text-completion API, which editors and evaluation harnesses still use.
Prompts come as a string, a list of strings, token ids or a list of them (one engine request each, run
together); `echo` with `logprobs` returns the prompt's own logprobs, and `max_tokens: 0` with `echo` scores the
prompt alone (the harnesses' loglikelihood requests)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwen2.serving.constraints import request_constraint
from qwen2.serving.handling import (EventStreamResponse, Served, check_token_ids, event_stream, merge, note,
                                   sampling_params, start, until_disconnect)
from qwen2.serving.http_errors import APIError
from qwen2.serving.logprobs import completion_logprobs
from qwen2.serving.metrics import RequestRecord
from qwen2.serving.outputs import CompletionOutput, RequestOutput
from qwen2.serving.protocol import Completion, CompletionChoice, CompletionRequest, Usage


@dataclass
class _Prompt:
    text: str
    ids: list[int]


def _prompts(served: Served, body: CompletionRequest) -> list[_Prompt]:
    prompts = []
    for index, prompt in enumerate(body.prompts()):
        param = "prompt" if isinstance(body.prompt, str) or body.prompt and isinstance(body.prompt[0], int) \
            else f"prompt[{index}]"
        if isinstance(prompt, str):
            ids = served.tokenizer.encode(prompt)
            text = prompt
        else:
            check_token_ids(prompt, served.vocab_size, param)
            ids, text = prompt, served.tokenizer.decode(prompt)
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        prompts.append(_Prompt(text, ids))
    return prompts


async def completion(request: Request, body: CompletionRequest, served: Served, record: RequestRecord) -> Response:
    prompts = _prompts(served, body)
    # The engine always generates at least one token: a prompt-only request drops the one it makes.
    score_only = body.max_tokens == 0
    structured, field = request_constraint(body)
    params = sampling_params(body, max_tokens=1 if score_only else body.max_tokens, vocab_size=served.vocab_size,
                             logprobs=body.logprobs,
                             prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
                             structured=structured)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    record.request_id = request_id
    records = [RequestRecord(arrival=record.arrival) for _ in prompts]
    started = await asyncio.gather(*(
        start(served.engine, f"{request_id}-{i}", p.ids, params, records[i], prompt=p.text, prompt_param="prompt",
              constraint_param=field)
        for i, p in enumerate(prompts)), return_exceptions=True)
    failed = next((item for item in started if isinstance(item, BaseException)), None)
    if failed is not None:
        await asyncio.gather(*(item.aclose() for item in started if not isinstance(item, BaseException)))
        raise failed
    view = _View(body, served, prompts, score_only)
    outputs = merge(list(started))  # type: ignore[arg-type]
    if body.stream:
        return EventStreamResponse(event_stream(view.chunks(request_id, outputs, record, records)))
    finals = await until_disconnect(request, _finals(outputs, len(prompts), record, records))
    if finals is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    choices = [view.choice(i, final, output) for i, final in enumerate(finals) for output in final.outputs]
    answer = Completion(id=request_id, model=served.model_name, choices=choices, usage=view.usage(finals))
    return JSONResponse(answer.model_dump())


def _sum_records(record: RequestRecord, records: list[RequestRecord]) -> None:
    record.prompt_tokens = sum(r.prompt_tokens for r in records)
    record.completion_tokens = sum(r.completion_tokens for r in records)
    firsts = [r.first_token for r in records if r.first_token is not None]
    record.first_token = min(firsts) if firsts else None
    if all(r.finished is not None for r in records):
        record.finished = max(r.finished for r in records)  # type: ignore[type-var]


async def _finals(outputs: AsyncIterator[tuple[int, RequestOutput]], count: int, record: RequestRecord,
                  records: list[RequestRecord]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * count
    async for index, output in outputs:
        note(records[index], output)
        finals[index] = output
    _sum_records(record, records)
    return finals  # type: ignore[return-value]


class _View:
    """How one request's outputs read as OpenAI completion choices."""

    def __init__(self, body: CompletionRequest, served: Served, prompts: list[_Prompt], score_only: bool) -> None:
        self.body, self.served, self.prompts, self.score_only = body, served, prompts, score_only

    def _full(self, prompt_index: int, snapshot: RequestOutput,
              output: CompletionOutput) -> tuple[str, list[int], list[Any]]:
        """The choice's text, token ids and logprob entries so far: the prompt's first under echo."""
        text, ids, entries = ("", [], []) if self.score_only else (
            output.text, output.token_ids, list(output.logprobs or []))
        if self.body.echo:
            prompt = self.prompts[prompt_index]
            text, ids = prompt.text + text, prompt.ids + ids
            entries = list(snapshot.prompt_logprobs or [None] * len(prompt.ids)) + entries
        return text, ids, entries

    def _finish(self, output: CompletionOutput) -> str | None:
        return ("length" if self.score_only else output.finish_reason) if output.finished else None

    def choice(self, prompt_index: int, final: RequestOutput, output: CompletionOutput) -> CompletionChoice:
        text, ids, entries = self._full(prompt_index, final, output)
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = completion_logprobs(ids, entries, self.body.logprobs, self.served.token_text)
        return CompletionChoice(index=prompt_index * self.body.n + output.index, text=text, logprobs=logprobs,
                                finish_reason=self._finish(output), stop_reason=output.stop_reason)

    def usage(self, finals: list[RequestOutput]) -> Usage:
        prompt = sum(len(final.prompt_token_ids) for final in finals)
        completion = 0 if self.score_only else sum(len(o.token_ids) for final in finals for o in final.outputs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def chunks(self, request_id: str, outputs: AsyncIterator[tuple[int, RequestOutput]], record: RequestRecord,
                     records: list[RequestRecord]) -> AsyncIterator[dict[str, Any]]:
        body, created = self.body, int(time.time())
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (characters, tokens) sent
        finals: list[RequestOutput | None] = [None] * len(self.prompts)
        async for prompt_index, snapshot in outputs:
            note(records[prompt_index], snapshot)
            finals[prompt_index] = snapshot
            for output in snapshot.outputs:
                index = prompt_index * body.n + output.index
                text, ids, entries = self._full(prompt_index, snapshot, output)
                chars, tokens = sent.get(index, (0, 0))
                finish = self._finish(output)
                if len(text) == chars and finish is None:
                    continue
                sent[index] = (len(text), len(ids))
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(ids[tokens:], entries[tokens:], body.logprobs,
                                                   self.served.token_text, text_offset=chars)
                event: dict[str, Any] = {
                    "id": request_id, "object": "text_completion", "created": created,
                    "model": self.served.model_name,
                    "choices": [{"index": index, "text": text[chars:], "logprobs": logprobs, "finish_reason": finish}],
                }
                if continuous:  # vLLM's option: the usage so far on every chunk
                    prompt_tokens = sum(r.prompt_tokens for r in records)
                    done = sum(r.completion_tokens for r in records)
                    event["usage"] = Usage(prompt_tokens=prompt_tokens, completion_tokens=done,
                                           total_tokens=prompt_tokens + done).model_dump()
                elif include_usage:
                    event["usage"] = None
                yield event
        _sum_records(record, records)
        if include_usage:
            yield {"id": request_id, "object": "text_completion", "created": created, "model": self.served.model_name,
                   "choices": [], "usage": self.usage(finals).model_dump()}  # type: ignore[arg-type]
