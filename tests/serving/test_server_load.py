"""A bounded load test on loopback: 24 concurrent streaming clients send 96 greedy requests of random lengths,
a quarter of them hanging up part-way (some streaming, some not). No 5xx; every stream that is read to its end
ends with one `[DONE]`; its tokens (from the chunks' logprobs) are exactly the first tokens of the prompt's
greedy answer (nothing lost, duplicated or mixed between requests) and their number is the reported usage; and
once the clients are gone the engine is idle with its KV pool whole again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import httpx
import pytest

from qwen2.serving.app import ServerState
from server_harness import MODEL_NAME, engine_on, start_server, tiny_dir  # noqa: F401 (a fixture)

PROMPTS = [f"Request {k}: tell me about {topic}." for k, topic in
           enumerate(["rivers", "bread", "stars", "compilers", "tea", "owls", "glass", "chess"])]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tiny_dir):
    engine = engine_on(tiny_dir, max_num_seqs=8, max_waiting=256)
    running = start_server(ServerState(model_name=MODEL_NAME), lambda: engine)
    yield running, engine
    running.stop()


def _body(prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, "logprobs": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _reference(http: httpx.AsyncClient) -> dict[str, list[list[int]]]:
    """Each prompt's greedy tokens (as bytes), one request at a time."""
    answers = {}
    for prompt in PROMPTS:
        response = await http.post("/chat/completions", json=_body(prompt, MAX_TOKENS, False))
        answers[prompt] = [entry["bytes"] for entry in response.json()["choices"][0]["logprobs"]["content"]]
    return answers


async def _streaming_client(http: httpx.AsyncClient, prompt: str, max_tokens: int, hang_up_after: int | None):
    async with http.stream("POST", "/chat/completions", json=_body(prompt, max_tokens, True)) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        lines = response.aiter_lines()
        events, done = [], 0
        async for line in lines:
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done += 1
                continue
            assert not done, "an event after [DONE]"
            events.append(json.loads(line[6:]))
            if hang_up_after is not None and len(events) >= hang_up_after:
                await lines.aclose()
                return {"status": 200, "hung_up": True}
    return {"status": 200, "events": events, "done": done}


async def _impatient_client(http: httpx.AsyncClient, prompt: str) -> dict:
    """A non-streaming client that gives up after 50 ms: the server must abort its request."""
    with contextlib.suppress(httpx.TimeoutException):
        await http.post("/chat/completions", json=_body(prompt, MAX_TOKENS, False), timeout=0.05)
    return {"status": 200, "hung_up": True}


def test_concurrent_streams_with_disconnects(server):
    running, engine = server
    rng = random.Random(0)

    async def scenario():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=running.base_url, timeout=300, limits=limits) as http:
            reference = await _reference(http)
            jobs = []
            for k in range(96):
                prompt = rng.choice(PROMPTS)
                roll = rng.random()
                if roll < 0.05:
                    jobs.append((prompt, None, _impatient_client(http, prompt)))
                else:
                    hang_up = rng.randint(1, 6) if roll < 0.25 else None
                    max_tokens = rng.randint(1, MAX_TOKENS)
                    jobs.append((prompt, max_tokens, (hang_up, max_tokens)))
            gate = asyncio.Semaphore(24)

            async def run(job):
                prompt, max_tokens, work = job
                async with gate:
                    if isinstance(work, tuple):
                        return await _streaming_client(http, prompt, max_tokens, work[0])
                    return await work

            results = await asyncio.gather(*(run(job) for job in jobs))
            return reference, jobs, results

    reference, jobs, results = asyncio.run(scenario())
    completed = 0
    for (prompt, max_tokens, _), result in zip(jobs, results):
        assert result["status"] == 200, result
        if result.get("hung_up"):
            continue
        completed += 1
        events = result["events"]
        assert result["done"] == 1
        assert len({event["id"] for event in events}) == 1
        usage = events[-1]["usage"]
        assert events[-1]["choices"] == [] and usage["completion_tokens"] == max_tokens
        tokens = [entry["bytes"] for event in events[:-1] for choice in event["choices"]
                  for entry in (choice.get("logprobs") or {}).get("content", [])]
        assert tokens == reference[prompt][:max_tokens]
        text = "".join(choice["delta"].get("content") or "" for event in events[:-1] for choice in event["choices"])
        assert text.encode() == b"".join(bytes(t) for t in tokens) or "\ufffd" in text
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert completed >= 60

    for _ in range(500):  # aborts of the last hang-ups are applied between two engine steps
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
            break
        time.sleep(0.01)
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert httpx.get(running.url + "/health").status_code == 200
