"""The OpenAI-compatible server on a tiny random model, driven by clients we did not write (`openai`, sync and
async, streaming and not; `langchain-openai`): greedy answers equal `generate()`'s on the same prompt ids,
streamed chunks reassemble to the whole answer, usage and logprobs equal the tokenizer's counts and the model's
own log-softmax, and the small routes (/v1/models, /tokenize, /detokenize, /health, /metrics) answer."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

import qwen2
from qwen2.serving.app import ServerState
from server_harness import MODEL_NAME, engine_on, start_server, tiny_dir  # noqa: F401 (a fixture)

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]



@pytest.fixture(scope="module")
def reference(tiny_dir):
    model = qwen2.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, qwen2.AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny_dir):
    engine = engine_on(tiny_dir)
    running = start_server(ServerState(model_name=MODEL_NAME), lambda: engine)
    _wait_ready(running.url)
    yield running
    running.stop()


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while httpx.get(url + "/health").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.05)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def greedy(reference, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model, _ = reference
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def chat_ids(reference, messages, **kwargs) -> list[int]:
    return reference[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                            **kwargs)


def test_chat_greedy_equals_generate_and_usage_counts_tokens(client, reference):
    ids = chat_ids(reference, MESSAGES)
    expected = greedy(reference, ids, 12)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=12)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference[1].decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if expected[-1] == 151645 else "length")
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == len(expected)
    assert answer.usage.total_tokens == len(ids) + len(expected)
    assert answer.model == MODEL_NAME and answer.id.startswith("chatcmpl-")


def test_streamed_chunks_reassemble_to_the_whole_answer(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_completion_tokens=16)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks[:-1]]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert len({chunk.id for chunk in chunks}) == 1


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_async_client_concurrent_requests_each_equal_generate(server, reference):
    prompts = [[{"role": "user", "content": f"Count to {k}."}] for k in range(1, 6)]

    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        whole = [client.chat.completions.create(model=MODEL_NAME, messages=m, temperature=0, max_tokens=10)
                 for m in prompts]
        answers = await asyncio.gather(*whole)
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=prompts[0], temperature=0,
                                                      max_tokens=10, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return answers, streamed

    answers, streamed = asyncio.run(run())
    for messages, answer in zip(prompts, answers):
        expected = greedy(reference, chat_ids(reference, messages), 10)
        assert answer.choices[0].message.content == reference[1].decode(expected, skip_special_tokens=True)
    assert streamed == answers[0].choices[0].message.content


def test_completions_take_every_prompt_form(client, reference):
    tokenizer = reference[1]
    texts = ["def fib(n):", "The capital of France is"]
    ids = [tokenizer.encode(t) for t in texts]
    expected = [tokenizer.decode(greedy(reference, i, 6), skip_special_tokens=True) for i in ids]
    for prompt, want in [(texts[0], expected[:1]), (texts, expected), (ids[1], expected[1:]), (ids, expected)]:
        answer = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=6)
        assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == want
        assert answer.usage.prompt_tokens == sum(len(i) for i in (ids if len(want) == 2 else
                                                                   [ids[expected.index(want[0])]]))
    two = client.completions.create(model=MODEL_NAME, prompt=texts, temperature=0, max_tokens=6, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices] == [expected[0], expected[0], expected[1], expected[1]]
    streamed = {}
    for chunk in client.completions.create(model=MODEL_NAME, prompt=texts, temperature=0, max_tokens=6, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: expected[0], 1: expected[1]}
    usages = [chunk.usage for chunk in client.completions.create(
        model=MODEL_NAME, prompt=texts[0], temperature=0, max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"stream_options": {"continuous_usage_stats": True}})]
    assert [u.completion_tokens for u in usages[:-1]] == sorted(u.completion_tokens for u in usages[:-1])
    assert usages[-1].prompt_tokens == len(ids[0]) and usages[-1].completion_tokens == 6


def _log_softmax(reference, ids: list[int]) -> torch.Tensor:
    model, _ = reference
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completions_echo_logprobs_score_the_prompt(client, reference):
    tokenizer = reference[1]
    prompt = "The quick brown fox jumps over"
    ids = tokenizer.encode(prompt)
    table = _log_softmax(reference, ids)
    answer = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = answer.choices[0]
    assert choice.text == prompt
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == prompt
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [table[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
    for p in range(1, len(ids)):
        best = torch.topk(table[p - 1], 2).indices.tolist()
        assert set(logprobs.top_logprobs[p]) >= {tokenizer.decode([t]) for t in best}
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0


def test_chat_logprobs_are_the_models(client, reference):
    ids = chat_ids(reference, MESSAGES)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=5,
                                            logprobs=True, top_logprobs=3)
    generated = greedy(reference, ids, 5)
    table = _log_softmax(reference, ids + generated)
    content = answer.choices[0].logprobs.content
    assert len(content) == len(generated)
    for k, (entry, token) in enumerate(zip(content, generated)):
        row = table[len(ids) - 1 + k]
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-3)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-3)


def test_stop_strings_and_token_limits(client, reference):
    ids = chat_ids(reference, MESSAGES)
    generated = greedy(reference, ids, 12)
    full = reference[1].decode(generated, skip_special_tokens=True)
    stop = next(piece for piece in (reference[1].decode([t]) for t in generated[3:]) if piece.strip())
    answer = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=12,
                                            stop=[stop])
    assert answer.choices[0].message.content == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    limited = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0,
                                             max_completion_tokens=3, max_tokens=50)
    assert limited.usage.completion_tokens == 3 and limited.choices[0].finish_reason == "length"


def test_sampling_fields_are_honoured_and_seeded(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0.9, top_p=0.9, seed=7, n=2,
                  presence_penalty=0.5, frequency_penalty=0.5,
                  extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1]


def test_logit_bias_forces_a_token(client, reference):
    token = reference[1].encode(" banana")[0]
    answer = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=3,
                                            logit_bias={str(token): 100})
    assert answer.choices[0].message.content == reference[1].decode([token] * 3)


def test_tokenize_detokenize_models_health_metrics(server, client, reference):
    tokenizer = reference[1]
    text = "héllo wörld <|im_end|>"
    tokens = httpx.post(server.url + "/tokenize", json={"model": MODEL_NAME, "prompt": text}).json()
    assert tokens["tokens"] == tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 512
    chat = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == chat_ids(reference, MESSAGES)
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(tokens["tokens"])}
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert httpx.get(server.url + "/health").status_code == 200
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("qwen2_requests_running", "qwen2_requests_waiting", "qwen2_kv_blocks_in_use",
                 "qwen2_prefix_cache_hit_rate", "qwen2_time_to_first_token_seconds",
                 "qwen2_time_per_output_token_seconds", "qwen2_prompt_tokens", "qwen2_generation_tokens"):
        assert name in families, name
    served = {s.labels["route"]: s.value for s in families["qwen2_http_requests"].samples
              if s.name.endswith("_total") and s.labels["status"] == "200"}
    assert served["/tokenize"] >= 2 and served["/detokenize"] >= 1


def test_langchain_chat_openai_plain_streaming_and_tool_round_trip(server, reference):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base_url, api_key="unused", model=MODEL_NAME, temperature=0, max_tokens=8,
                     max_retries=0)
    question = [HumanMessage("Name three colours.")]
    expected = reference[1].decode(greedy(reference, chat_ids(reference, [{"role": "user", "content":
                                                                         "Name three colours."}]), 8),
                                   skip_special_tokens=True)
    assert llm.invoke(question).content == expected
    assert "".join(chunk.content for chunk in llm.stream(question)) == expected

    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return "sunny"

    with_tools = llm.bind_tools([get_weather])
    conversation = [HumanMessage("Weather in Paris?"),
                    AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
                    ToolMessage("sunny", tool_call_id="call_1")]
    answer = with_tools.invoke(conversation)
    tool_schema = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather in a city.",
        "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}}
    ids = chat_ids(reference, [{"role": "user", "content": "Weather in Paris?"},
                               {"role": "assistant", "content": "", "tool_calls": [
                                   {"type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": "Paris"}}}]},
                               {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}], tools=[tool_schema])
    assert answer.usage_metadata["input_tokens"] == len(ids)  # LangChain's messages rendered as the template would
    assert answer.content == reference[1].decode(greedy(reference, ids, 8), skip_special_tokens=True)
