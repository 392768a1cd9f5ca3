"""Bad requests over raw HTTP (httpx): each gets its 4xx in OpenAI's error shape with the field at fault named,
and the server keeps serving. Then the statuses that need a particular server: 401 with an API key, 429 with
Retry-After when the engine's queue is full, 503 while loading and while shutting down."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from qwen2.serving.app import ServerState
from server_harness import MODEL_NAME, engine_on, start_server, tiny_dir  # noqa: F401 (a fixture)

USER = [{"role": "user", "content": "hi"}]



@pytest.fixture(scope="module")
def server(tiny_dir):
    engine = engine_on(tiny_dir)
    running = start_server(ServerState(model_name=MODEL_NAME, max_body_bytes=64 * 1024), lambda: engine)
    yield running
    running.stop()


def chat(**fields):
    return ("/v1/chat/completions", {"model": MODEL_NAME, "messages": USER, "max_tokens": 2, **fields})


def complete(**fields):
    return ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **fields})


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
MATRIX = {
    # wrong types
    "messages not a list": (chat(messages="hi"), "messages"),
    "temperature a string": (chat(temperature="0.5"), "temperature"),
    "temperature a bool": (chat(temperature=True), "temperature"),
    "n a float": (chat(n=1.5), "n"),
    "n a bool": (chat(n=True), "n"),
    "max_tokens a string": (chat(max_tokens="5"), "max_tokens"),
    "stop a number": (chat(stop=5), "stop"),
    "logprobs a string": (chat(logprobs="yes"), "logprobs"),
    "seed a string": (chat(seed="x"), "seed"),
    "stream a string": (chat(stream="yes"), "stream"),
    "content a number": (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    "image content part": (chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), "messages[0].content"),
    "prompt a number": (complete(prompt=5), "prompt"),
    "prompt mixed list": (complete(prompt=[1, "a"]), "prompt"),
    "echo a string": (complete(echo="x"), "echo"),
    "completion logprobs a bool": (complete(logprobs=True), "logprobs"),
    # wrong ranges
    "temperature above 2": (chat(temperature=3), "temperature"),
    "top_p zero": (chat(top_p=0), "top_p"),
    "top_p above 1": (chat(top_p=1.5), "top_p"),
    "n zero": (chat(n=0), "n"),
    "max_tokens zero": (chat(max_tokens=0), "max_tokens"),
    "max_tokens negative": (chat(max_tokens=-1), "max_tokens"),
    "max_completion_tokens zero": (chat(max_completion_tokens=0), "max_completion_tokens"),
    "too many stop strings": (chat(stop=["a"] * 17), "stop"),
    "empty stop string": (chat(stop=[""]), "stop"),
    "top_logprobs above 20": (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    "presence_penalty above 2": (chat(presence_penalty=3), "presence_penalty"),
    "frequency_penalty below -2": (chat(frequency_penalty=-3), "frequency_penalty"),
    "logit_bias key not an id": (chat(logit_bias={"abc": 1}), "logit_bias"),
    "logit_bias value above 100": (chat(logit_bias={"5": 200}), "logit_bias"),
    "logit_bias id outside vocabulary": (chat(logit_bias={"999999999": 1}), "logit_bias"),
    "stop_token_ids outside vocabulary": (chat(stop_token_ids=[999999999]), "stop_token_ids"),
    "top_k below -1": (chat(top_k=-2), "top_k"),
    "min_p above 1": (chat(min_p=2), "min_p"),
    "repetition_penalty zero": (chat(repetition_penalty=0), "repetition_penalty"),
    "empty messages": (chat(messages=[]), "messages"),
    "prompt token outside vocabulary": (complete(prompt=[999999999]), "prompt"),
    "empty prompt": (complete(prompt=""), "prompt"),
    "empty prompt list": (complete(prompt=[]), "prompt"),
    "completion logprobs above 20": (complete(logprobs=21), "logprobs"),
    "context too long": (chat(max_tokens=100_000), "messages"),
    # wrong combinations
    "top_logprobs without logprobs": (chat(top_logprobs=2), "top_logprobs"),
    "stream_options without stream": (chat(stream_options={"include_usage": True}), "stream_options"),
    "tool_choice without tools": (chat(tool_choice="auto"), "tool_choice"),
    "tool_choice naming an unknown tool": (chat(tools=[TOOL], tool_choice={"type": "function",
                                                                           "function": {"name": "g"}}),
                                           "tool_choice.function.name"),
    "forced tool with an invalid schema": (chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "nonsense"}}}], tool_choice="required"), "tools"),
    "tool_choice unknown": (chat(tools=[TOOL], tool_choice="sometimes"), "tool_choice"),
    "tool without function": (chat(tools=[{"type": "function"}]), "tools[0].function"),
    "tool with a bad name": (chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
                             "tools[0].function.name"),
    "json_schema response_format without its schema": (chat(response_format={"type": "json_schema"}),
                                                        "response_format"),
    "response_format with an invalid schema": (chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}),
        "response_format"),
    "structured_outputs with two constraints": (chat(structured_outputs={"regex": "a", "choice": ["b"]}),
                                                "structured_outputs"),
    "structured_outputs with an invalid grammar": (complete(structured_outputs={"grammar": "start: nope"}),
                                                   "structured_outputs"),
    "guided_regex invalid": (chat(guided_regex="[a-"), "guided_regex"),
    "two fields constraining the answer": (chat(response_format={"type": "json_object"}, guided_choice=["a"]),
                                           "guided_choice"),
    "min_tokens above max_tokens": (chat(min_tokens=5, max_tokens=2), "min_tokens"),
    "max_tokens 0 without echo": (complete(max_tokens=0), "max_tokens"),
    "best_of other than n": (complete(best_of=3), "best_of"),
    "suffix": (complete(suffix="x"), "suffix"),
    # messages
    "unknown role": (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0]"),
    "missing content": (chat(messages=[{"role": "user"}]), "messages[0].content"),
    "assistant with neither content nor calls": (chat(messages=[{"role": "assistant"}]), "messages[0]"),
    "tool message without its call": (chat(messages=USER + [{"role": "tool", "content": "r",
                                                             "tool_call_id": "call_x"}]), "messages[1].tool_call_id"),
    "tool message without an id": (chat(messages=USER + [{"role": "tool", "content": "r"}]),
                                   "messages[1].tool_call_id"),
    "missing messages": (("/v1/chat/completions", {"model": MODEL_NAME}), "messages"),
    "missing model": (("/v1/chat/completions", {"messages": USER}), "model"),
    "detokenize a negative id": (("/detokenize", {"tokens": [-1]}), "tokens[0]"),
    "detokenize outside vocabulary": (("/detokenize", {"tokens": [999999999]}), "tokens"),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_field_is_a_400_naming_it(server, case):
    (path, body), param = MATRIX[case]
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]
    assert param.split("[")[0].split(".")[0] in error["message"]
    if case == "context too long":
        assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("content, message", [
    (b'{"model": ', "malformed JSON"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe", "malformed JSON"),
])
def test_unparseable_bodies_are_400(server, content, message):
    response = httpx.post(server.base_url + "/chat/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_huge_body_is_413_unknown_model_404_unknown_route_404(server):
    huge = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 100_000}]}
    response = httpx.post(server.base_url + "/chat/completions", json=huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(server.base_url + "/chat/completions", content=iter([b"x" * 40_000] * 3))
    assert chunked.status_code == 413
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    assert httpx.get(server.base_url + "/nowhere").status_code == 404
    assert httpx.get(server.base_url + "/chat/completions").status_code == 405


def test_server_keeps_serving_after_the_matrix(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens == 3


def test_api_key_is_required_when_set(tiny_dir):
    engine = engine_on(tiny_dir)
    running = start_server(ServerState(model_name=MODEL_NAME, api_key="sekret"), lambda: engine)
    try:
        assert httpx.post(running.base_url + "/chat/completions", json=chat()[1]).status_code == 401
        wrong = httpx.get(running.base_url + "/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.post(running.url + "/tokenize", json={"prompt": "x"}).status_code == 401
        assert httpx.get(running.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.base_url, api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=running.base_url, api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2).choices
    finally:
        running.stop()


def test_full_queue_is_429_with_retry_after(tiny_dir):
    engine = engine_on(tiny_dir, max_num_seqs=1, max_waiting=1)
    step = engine.engine.step

    def slow_step():  # the tiny model is fast: slow its steps so the first request is still running
        time.sleep(0.02)
        return step()

    engine.engine.step = slow_step
    running = start_server(ServerState(model_name=MODEL_NAME), lambda: engine)

    async def scenario():
        async with httpx.AsyncClient(base_url=running.base_url, timeout=120) as http:
            body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
            async with http.stream("POST", "/chat/completions", json=body) as first:
                lines = first.aiter_lines()  # kept: a dropped line iterator closes the stream when collected
                await lines.__anext__()  # running now
                waiting = asyncio.ensure_future(http.post("/chat/completions", json={**body, "stream": False,
                                                                                     "max_tokens": 2}))
                for _ in range(1000):
                    if engine.stats().num_waiting:
                        break
                    await asyncio.sleep(0.01)
                refused = await http.post("/chat/completions", json=body)
            return refused, await waiting

    try:
        refused, waited = asyncio.run(scenario())
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert waited.status_code == 200  # the waiting one ran once the first left
    finally:
        running.stop()


def test_503_while_loading_and_shutting_down(tiny_dir):
    release = threading.Event()

    def slow_factory():
        release.wait(60)
        return engine_on(tiny_dir)

    state = ServerState(model_name=MODEL_NAME)
    running = start_server(state, slow_factory)
    try:
        loading = httpx.post(running.base_url + "/chat/completions", json=chat()[1])
        assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
        assert httpx.get(running.url + "/health").status_code == 503
        release.set()
        for _ in range(600):
            if httpx.get(running.url + "/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert httpx.post(running.base_url + "/chat/completions", json=chat()[1]).status_code == 200
        state.shutting_down = True
        stopping = httpx.post(running.base_url + "/chat/completions", json=chat()[1])
        assert stopping.status_code == 503 and "shutting down" in stopping.json()["error"]["message"]
    finally:
        release.set()
        running.stop()
