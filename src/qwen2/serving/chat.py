"""POST /v1/chat/completions: OpenAI messages -> the model's chat template -> the engine -> an OpenAI answer,
whole or streamed as `chat.completion.chunk` events, with Qwen2.5 tool calls parsed into `tool_calls`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwen2.serving.handling import (EventStreamResponse, Served, event_stream, note, sampling_params, start,
                                   until_disconnect)
from qwen2.serving.constraints import request_constraint
from qwen2.serving.http_errors import APIError
from qwen2.serving.logprobs import chat_logprobs
from qwen2.serving.metrics import RequestRecord
from qwen2.serving.outputs import CompletionOutput, RequestOutput
from qwen2.serving.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessage,
                                    Message, SystemMessage, ToolCall, ToolMessage, Usage, text_of)
from qwen2.serving.tool_calls import ParsedCall, ToolCallStreamParser, new_call_id, parse_tool_calls


def template_messages(conversation: list[Message]) -> list[dict[str, Any]]:
    """The messages as the chat template expects them; a tool result must answer an earlier call."""
    messages: list[dict[str, Any]] = []
    open_calls: set[str] = set()
    for index, message in enumerate(conversation):
        if isinstance(message, SystemMessage):
            messages.append({"role": "system", "content": text_of(message.content)})
        elif isinstance(message, AssistantMessage):
            entry: dict[str, Any] = {"role": "assistant", "content": text_of(message.content) or ""}
            if message.tool_calls:
                entry["tool_calls"] = [_template_call(call) for call in message.tool_calls]
                open_calls.update(call.id for call in message.tool_calls)
            messages.append(entry)
        elif isinstance(message, ToolMessage):
            if message.tool_call_id not in open_calls:
                param = f"messages[{index}].tool_call_id"
                raise APIError(400, f"{param}: {message.tool_call_id!r} answers no tool call of an earlier "
                                    "assistant message", param=param)
            open_calls.discard(message.tool_call_id)
            messages.append({"role": "tool", "content": text_of(message.content),
                             "tool_call_id": message.tool_call_id})
        else:
            messages.append({"role": "user", "content": text_of(message.content)})
    return messages


def _template_call(call: ToolCall) -> dict[str, Any]:
    """Qwen2.5's template writes `arguments | tojson`: give it the object the model itself wrote, not the JSON
    text of it (which would be quoted twice)."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def _uses_tools(body: ChatCompletionRequest) -> bool:
    return bool(body.tools) and body.tool_choice != "none"


def prompt_ids(served: Served, body: ChatCompletionRequest, tools: bool) -> list[int]:
    schemas = [tool.model_dump(exclude_none=True) for tool in body.tools] if tools and body.tools else None
    try:
        return served.tokenizer.apply_chat_template(
            template_messages(body.messages), tools=schemas, add_generation_prompt=True, tokenize=True, return_dict=False,
            sanitize_control_tokens=True)
    except APIError:
        raise
    except Exception as error:  # the template refused the conversation (raise_exception in Jinja)
        raise APIError(400, f"messages: the chat template rejected the conversation: {error}",
                       param="messages") from error


async def chat_completion(request: Request, body: ChatCompletionRequest, served: Served,
                          record: RequestRecord) -> Response:
    tools = _uses_tools(body)
    structured, field = request_constraint(body)
    ids = prompt_ids(served, body, tools)
    top = body.top_logprobs or 0
    params = sampling_params(body, max_tokens=body.max_new_tokens(), vocab_size=served.vocab_size,
                             logprobs=top if body.logprobs else None, structured=structured)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    record.request_id = request_id
    outputs = await start(served.engine, request_id, ids, params, record, prompt_param="messages",
                          constraint_param="tools" if field == "tool_choice" else field)
    if body.stream:
        return EventStreamResponse(event_stream(_chunks(body, served, request_id, outputs, record, tools, top)))
    final = await until_disconnect(request, _last(outputs, record))
    if final is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    choices = [_choice(output, served, body, tools, top) for output in final.outputs]
    answer = ChatCompletion(id=request_id, model=served.model_name, choices=choices, usage=usage(final))
    return JSONResponse(answer.model_dump())


async def _last(outputs: AsyncIterator[RequestOutput], record: RequestRecord) -> RequestOutput:
    async for last in outputs:
        note(record, last)
    return last


def _tool_names(body: ChatCompletionRequest) -> frozenset[str]:
    return frozenset(tool.function.name for tool in body.tools or [])


def usage(output: RequestOutput) -> Usage:
    completion = sum(len(choice.token_ids) for choice in output.outputs)
    prompt = len(output.prompt_token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": output.num_cached_tokens})


def _finish_reason(output: CompletionOutput, calls: list[ParsedCall]) -> str | None:
    return "tool_calls" if calls and output.finish_reason == "stop" else output.finish_reason


def _choice(output: CompletionOutput, served: Served, body: ChatCompletionRequest, tools: bool,
            top: int) -> ChatChoice:
    content, calls = parse_tool_calls(output.text, _tool_names(body)) if tools else (output.text, [])
    tool_calls = [ToolCall.model_validate(call.to_openai(new_call_id())) for call in calls] or None
    logprobs = None
    if body.logprobs and output.logprobs is not None:
        logprobs = chat_logprobs(output.token_ids, output.logprobs, top, served.token_text)
    return ChatChoice(index=output.index, message=ChatMessage(content=content, tool_calls=tool_calls),
                      logprobs=logprobs, finish_reason=_finish_reason(output, calls),
                      stop_reason=output.stop_reason)


class _ChoiceStream:
    """One choice's progress through a stream: what was sent, and its tool-call parser."""

    def __init__(self, tool_names: frozenset[str] | None) -> None:
        self.parser = ToolCallStreamParser(tool_names) if tool_names is not None else None
        self.text_sent = 0
        self.tokens_sent = 0
        self.calls_sent = 0
        self.done = False

    def events(self, output: CompletionOutput) -> list[str | ParsedCall]:
        delta, self.text_sent = output.text[self.text_sent:], len(output.text)
        if self.parser is None:
            return [delta] if delta else []
        events = self.parser.feed(delta)
        return events + self.parser.finish() if output.finished else events


async def _chunks(body: ChatCompletionRequest, served: Served, request_id: str, outputs: AsyncIterator[RequestOutput],
                  record: RequestRecord, tools: bool, top: int) -> AsyncIterator[dict[str, Any]]:
    created = int(time.time())
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats
    last: RequestOutput | None = None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": request_id, "object": "chat.completion.chunk", "created": created, "model": served.model_name,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage or continuous:
            event["usage"] = usage(last).model_dump() if continuous and last is not None else None
        return event

    states = [_ChoiceStream(_tool_names(body) if tools else None) for _ in range(body.n)]
    for index in range(body.n):
        yield chunk(index, {"role": "assistant", "content": ""})

    async for last in outputs:
        note(record, last)
        for output in last.outputs:
            state = states[output.index]
            if state.done:
                continue
            events = state.events(output)
            logprobs = None
            if body.logprobs and output.logprobs is not None and (events or output.finished):
                logprobs = chat_logprobs(output.token_ids[state.tokens_sent:], output.logprobs[state.tokens_sent:],
                                         top, served.token_text)
                state.tokens_sent = len(output.token_ids)
            for event in events:
                if isinstance(event, str):
                    yield chunk(output.index, {"content": event}, logprobs=logprobs)
                else:
                    position, state.calls_sent = state.calls_sent, state.calls_sent + 1
                    yield chunk(output.index, {"tool_calls": [{"index": position, "id": new_call_id(),
                                                               "type": "function",
                                                               "function": {"name": event.name, "arguments": ""}}]},
                                logprobs=logprobs)
                    yield chunk(output.index, {"tool_calls": [{"index": position,
                                                               "function": {"arguments": event.arguments}}]})
                logprobs = None
            if output.finished:
                state.done = True
                calls = state.parser.calls if state.parser else []
                yield chunk(output.index, {}, finish=_finish_reason(output, calls), logprobs=logprobs)
    if include_usage and last is not None:
        yield {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": served.model_name,
               "choices": [], "usage": usage(last).model_dump()}
