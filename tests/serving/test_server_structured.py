"""Structured output through the server on a tiny random model (which, left alone, writes garbage), driven by
clients we did not write: the `openai` client's `chat.completions.parse` with a pydantic model and raw
`response_format` json_schema, vLLM's `structured_outputs`/`guided_*` extras, forced tool calls
(`tool_choice: "required"` and a named function, streamed and not) and `langchain-openai`'s
`with_structured_output` (json_schema and function calling). Every answer must parse and validate (`jsonschema`,
pydantic): that is the mask's doing. A greedy json_schema answer equals generate()'s with the same schema."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import qwen2
from qwen2.serving.app import ServerState
from server_harness import MODEL_NAME, engine_on, start_server, tiny_dir  # noqa: F401 (a fixture)

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                         "hours": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["zone", "hours"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                           "parameters": TIME}}]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}


class Forecast(BaseModel):
    """Bounded fields and no others (additionalProperties false), so a random model's answer ends within a few
    dozen tokens."""

    model_config = ConfigDict(extra="forbid")

    city: Literal["Paris", "Oslo", "Lima"]
    days: int = Field(ge=1, le=7)
    summary: str = Field(max_length=8)


@pytest.fixture(scope="module")
def server(tiny_dir):
    engine = engine_on(tiny_dir, max_model_len=1024)
    running = start_server(ServerState(model_name=MODEL_NAME), lambda: engine)
    import httpx

    while httpx.get(running.url + "/health").status_code != 200:
        pass
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_json_schema_greedy_equals_generate_and_sampled_answers_validate(client, tiny_dir):
    schema = Forecast.model_json_schema()
    response_format = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=0, max_tokens=64,
                                            response_format=response_format)
    model = qwen2.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokenizer = qwen2.AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = model.generate(torch.tensor([ids]), json_schema=schema, tokenizer=tokenizer, max_new_tokens=64,
                              do_sample=False)[0, len(ids):]
    assert greedy.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    sampled = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=1.0, seed=3, n=3,
                                             max_tokens=64, response_format=response_format)
    for choice in greedy.choices + sampled.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_openai_parse_with_a_pydantic_model_and_json_object(client):
    for seed in (1, 2):
        parsed = client.chat.completions.parse(model=MODEL_NAME, messages=USER, response_format=Forecast,
                                               temperature=1.0, seed=seed, max_tokens=64)
        assert isinstance(parsed.choices[0].message.parsed, Forecast)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=0, max_tokens=48,
                                            response_format={"type": "json_object"})
    assert answer.choices[0].message.content.startswith("{")  # an object, cut by max_tokens or complete


def test_vllm_structured_outputs_and_guided_extras(client):
    colours = ["red", "green", "blue"]
    for extra in ({"structured_outputs": {"choice": colours}}, {"guided_choice": colours}):
        answer = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=1.0, seed=5, n=2,
                                                max_tokens=8, extra_body=extra)
        assert {choice.message.content for choice in answer.choices} <= set(colours)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        answer = client.completions.create(model=MODEL_NAME, prompt="Code:", temperature=0, max_tokens=16,
                                           extra_body=extra)
        assert re.fullmatch(pattern, answer.choices[0].text), answer.choices[0].text
    guided = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=0, max_tokens=64,
                                            extra_body={"guided_json": TIME})
    jsonschema.validate(json.loads(guided.choices[0].message.content), TIME)


def _check_calls(choice, names: set[str], most: int | None = None) -> None:
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert choice.message.tool_calls and (most is None or len(choice.message.tool_calls) <= most)
    for call in choice.message.tool_calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_tool_choice_required_and_named_always_give_valid_calls(client):
    for options in ({}, {"parallel_tool_calls": False}):
        answer = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required",
                                                temperature=1.0, seed=7, n=4, max_tokens=300, **options)
        for choice in answer.choices:
            _check_calls(choice, set(PARAMETERS), most=1 if options else None)
    named = {"type": "function", "function": {"name": "get_time"}}
    answer = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=named,
                                            temperature=1.0, seed=8, n=3, max_tokens=100)
    for choice in answer.choices:
        _check_calls(choice, {"get_time"}, most=1)


def test_forced_call_streams_as_the_whole_answer(client):
    kwargs = dict(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300)
    whole = client.chat.completions.create(**kwargs).choices[0]
    _check_calls(whole, set(PARAMETERS))
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                 for c in whole.message.tool_calls]


def test_langchain_with_structured_output_json_schema_and_function_calling(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base_url, api_key="unused", model=MODEL_NAME, temperature=1.0, max_tokens=200,
                     max_retries=0)
    for method in ("json_schema", "function_calling"):
        structured = llm.with_structured_output(Forecast, method=method)
        for seed in (1, 2):
            assert isinstance(structured.bind(seed=seed).invoke("Forecast for Paris?"), Forecast), method
