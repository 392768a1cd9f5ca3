"""The server on the real default model (float32 GGUF), few and short requests: a greedy chat answer equals
generate()'s and streams to the same text; a tool call is parsed into exactly the JSON arguments the model wrote
(generate()'s raw text is the reference), streamed as OpenAI's deltas that reassemble to the same call; and
LangChain's bind_tools round trip (the call, its result sent back, the next answer) works unchanged."""

from __future__ import annotations

import json
import re

import openai
import pytest
import torch

from qwen2.serving.app import ServerState
from qwen2.serving.async_engine import AsyncLLMEngine
from qwen2.serving.engine import LLMEngine
from server_harness import start_server

NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def real_server(default_gguf):
    engine = AsyncLLMEngine(LLMEngine.from_pretrained(str(default_gguf), dtype=torch.float32, max_num_seqs=4,
                                                      max_model_len=2048, kv_cache_memory=128 << 20))
    running = start_server(ServerState(model_name=NAME), lambda: engine)
    import httpx

    while httpx.get(running.url + "/health").status_code != 200:
        pass
    yield running, engine.engine
    running.stop()


def _generate(engine, messages, max_new_tokens: int, **template) -> tuple[list[int], list[int], str]:
    """The prompt ids, generate()'s greedy tokens (the end-of-turn token included) and their text."""
    tokenizer = engine.tokenizer
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        **template)
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    generated = out[0, len(ids):].tolist()
    return ids, generated, tokenizer.decode(generated, skip_special_tokens=True)


@pytest.mark.slow
def test_real_greedy_answer_equals_generate_and_streams_the_same(real_server):
    running, engine = real_server
    client = openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Write a one-line Python expression that reverses a string s."}]
    ids, generated, expected = _generate(engine, messages, 20)
    answer = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=20)
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == len(generated)  # the end-of-turn token counts, as in vLLM
    stream = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=20, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected


@pytest.mark.slow
def test_real_tool_call_has_the_arguments_the_model_wrote(real_server):
    running, engine = real_server
    _, _, raw = _generate(engine, ASK_WEATHER, 40, tools=[WEATHER])
    block = re.search(r"<tool_call>(.*?)</tool_call>", raw, re.S)
    written = json.loads(block.group(1) if block else raw)  # the 0.5B model often omits the tags
    assert written["name"] == "get_weather", raw
    client = openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=NAME, messages=ASK_WEATHER, tools=[WEATHER], temperature=0,
                                            max_tokens=40)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == written["name"] == "get_weather"
    assert json.loads(call.function.arguments) == written["arguments"]

    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model=NAME, messages=ASK_WEATHER, tools=[WEATHER], temperature=0,
                                                max_tokens=40, stream=True):
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            if delta_call.function.name:
                entry["name"] += delta_call.function.name
                assert delta_call.id and delta_call.type == "function"
            entry["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather",
                                                                                  written["arguments"])]


@pytest.mark.slow
def test_real_langchain_bind_tools_round_trip(real_server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    running, _ = real_server

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"Sunny and 22 degrees Celsius in {city}."

    llm = ChatOpenAI(base_url=running.base_url, api_key="unused", model=NAME, temperature=0, max_tokens=40,
                     max_retries=0).bind_tools([get_weather])
    history = [HumanMessage(ASK_WEATHER[0]["content"])]
    call_message = llm.invoke(history)
    [call] = call_message.tool_calls
    assert call["name"] == "get_weather" and "paris" in call["args"]["city"].lower()
    history += [call_message, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    final = llm.invoke(history)  # the result went back: the prompt grew by the call and its result
    assert final.usage_metadata["input_tokens"] > call_message.usage_metadata["input_tokens"] + 10
    assert final.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    # (the 0.5B model tends to repeat its call here rather than answer: a model limit, not the server's)


@pytest.mark.slow
def test_real_json_schema_answer_parses_into_the_pydantic_model(real_server):
    """The default model answers a question under a response_format json_schema (the openai client's parse with a
    pydantic model, strict): the answer is JSON matching the schema, parsed by the client."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Capital(BaseModel):
        country: str = Field(max_length=40)
        capital: str = Field(max_length=40)
        continent: Literal["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]

    running, _ = real_server
    client = openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    answer = client.chat.completions.parse(model=NAME, messages=messages, response_format=Capital, temperature=0,
                                           max_tokens=48)
    parsed = answer.choices[0].message.parsed
    assert answer.choices[0].finish_reason == "stop" and isinstance(parsed, Capital)
    assert parsed.capital == "Paris" and parsed.continent == "Europe"
