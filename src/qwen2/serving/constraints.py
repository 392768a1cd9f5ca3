"""What a request's fields constrain its answer to: OpenAI's `response_format`, vLLM's `structured_outputs` extra
(and its older `guided_*` spellings), and a forced tool call (`tool_choice: "required"` or a named function).

A forced call is a Lark grammar (as llguidance takes it) over Qwen2.5's call blocks,
`<tool_call>\\n{"name": <name>, "arguments": <object>}\\n</tool_call>`, each block's JSON a `%json` sub-grammar
whose `name` is the tool's and whose `arguments` follow the tool's parameter schema, so the server's tool-call
parser always finds the calls. Only one field may constrain an answer; a conflict is a 400 naming the fields.
"""

from __future__ import annotations

import json
from typing import Any

from qwen2.constrained.grammar import JSON_OPTIONS
from qwen2.serving.http_errors import APIError
from qwen2.serving.params import StructuredOutputsParams
from qwen2.serving.protocol import ChatCompletionRequest, NamedToolChoice, Tool, _Sampling
from qwen2.serving.tool_calls import CLOSE, OPEN

# "required" with parallel calls allowed: at most this many calls in one answer (a grammar that can always go
# on would let a weak model write calls until max_tokens cut the last one, which then is not a call).
MAX_PARALLEL_CALLS = 8


def forced_tools(body: ChatCompletionRequest) -> list[Tool] | None:
    """The tools a forced tool_choice allows (None if the choice is not forced); 400 for an unknown name."""
    if isinstance(body.tool_choice, NamedToolChoice):
        name = body.tool_choice.function.get("name")
        if set(body.tool_choice.function) != {"name"}:
            raise APIError(400, "tool_choice.function: give exactly the 'name' of a tool",
                           param="tool_choice.function")
        chosen = [tool for tool in body.tools or [] if tool.function.name == name]
        if not chosen:
            offered = ", ".join(repr(tool.function.name) for tool in body.tools or [])
            raise APIError(400, f"tool_choice.function.name: {name!r} is not one of the tools ({offered})",
                           param="tool_choice.function.name")
        return chosen
    return list(body.tools or []) if body.tool_choice == "required" else None


def tool_call_grammar(tools: list[Tool], max_calls: int) -> str:
    """A Lark grammar of 1 to `max_calls` Qwen2.5 call blocks, each calling one of `tools` with arguments that
    follow its parameter schema."""
    bodies = []
    for index, tool in enumerate(tools):
        schema = {"type": "object", "properties": {"name": {"const": tool.function.name},
                                                   "arguments": tool.function.parameters or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_OPTIONS}
        bodies.append(f"call{index}: %json {json.dumps(schema)}")
    repeat = f' ("\\n" call)~0..{max_calls - 1}' if max_calls > 1 else ""
    return "\n".join([f"start: call{repeat}",
                      f"call: {json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}",
                      "body: " + " | ".join(f"call{i}" for i in range(len(tools))), *bodies])


def _params(field: str, **constraint: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**constraint)
    except ValueError as error:
        raise APIError(400, f"{field}: {error}", param=field) from None


def request_constraint(body: _Sampling) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the constraint the request asks for, the field that asked) or (None, None); 400 when several ask."""
    asked: list[tuple[str, StructuredOutputsParams]] = []
    if isinstance(body, ChatCompletionRequest):
        response_format = body.response_format
        if response_format is not None and response_format.type == "json_object":
            asked.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif response_format is not None and response_format.type == "json_schema":
            schema = response_format.json_schema.json_schema  # type: ignore[union-attr]
            asked.append(("response_format", StructuredOutputsParams(json=True if schema is None else schema)))
        tools = forced_tools(body)
        if tools is not None:
            calls = 1 if isinstance(body.tool_choice, NamedToolChoice) or body.parallel_tool_calls is False \
                else MAX_PARALLEL_CALLS
            asked.append(("tool_choice", StructuredOutputsParams(grammar=tool_call_grammar(tools, calls))))
    extra = body.structured_outputs
    if extra is not None:
        asked.append(("structured_outputs", _params("structured_outputs", json=extra.json_, regex=extra.regex,
                                                    choice=extra.choice, grammar=extra.grammar,
                                                    json_object=bool(extra.json_object))))
    for field, name in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):
        if getattr(body, field) is not None:
            asked.append((field, _params(field, **{name: getattr(body, field)})))
    if len(asked) > 1:
        fields = ", ".join(field for field, _ in asked)
        raise APIError(400, f"only one field may constrain the answer, got {fields}", param=asked[1][0])
    return (asked[0][1], asked[0][0]) if asked else (None, None)
