"""Engine replicas on Ray Serve (qwen2.serving.ray) on a local cluster of 2 CPUs, driven by the `openai`
client through Ray's HTTP proxy: requests spread over both replicas, a conversation's prefix sticks to one,
a burst beyond the queue limit gets 429, and with one replica killed mid-load every request completes or
ends in an error the client can retry; nothing hangs and the cluster is shut down."""

from __future__ import annotations

import concurrent.futures
import signal

import pytest

from server_harness import tiny_dir  # noqa: F401 (a fixture)

ray = pytest.importorskip("ray", reason='needs the ray extra: pip install "qwen2[ray]"')


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    from ray import serve

    from qwen2.distributed.launch import free_port
    from qwen2.serving.ray import build_app

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(tiny_dir), served_model_name="tiny", replicas=2, max_ongoing_requests=4,
                            max_queued_requests=4, dtype="float32", threads=1, kv_cache_memory=16 * 2**20),
                  name="qwen2", route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in handlers.items():  # ray.init installs its own; later tests need the process' own
            signal.signal(sig, handler)
    assert not ray.is_initialized()


def _client(url: str, retries: int):
    import openai

    return openai.OpenAI(base_url=url, api_key="none", max_retries=retries, timeout=60)


def _ask(client, prompt: str, tokens: int = 8):
    raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=tokens,
                                                      temperature=0.0)
    return raw.headers["x-qwen2-replica"], raw.parse()


def test_replicas_spread_stick_refuse_and_survive_a_kill(cluster):
    import openai

    client = _client(cluster, retries=0)
    # Different prompts spread over both replicas (the chance that 12 hash to one is 2 ** -11); one
    # conversation's prefix always reaches the same one.
    assert len({_ask(client, f"prompt number {i}: ")[0] for i in range(12)}) == 2
    conversation = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Tell me about prime numbers."}]
    replicas = set()
    for turn in range(4):  # later turns of one conversation: the same system prompt and first turn
        messages = conversation + [{"role": "assistant", "content": f"answer {turn}"},
                                   {"role": "user", "content": f"and {turn}?"}][:2 * min(turn, 1)]
        raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=4)
        replicas.add(raw.headers["x-qwen2-replica"])
    assert len(replicas) == 1
    # A burst beyond 2 replicas x 4 running + 4 queued: the rest get OpenAI's rate-limit error.
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(lambda i: _outcome(client, f"burst {i}", 24), range(32)))
    assert "ok" in outcomes and 429 in outcomes and set(outcomes) <= {"ok", 429}
    # Kill one replica mid-load: every request completes (the client retries) or ends in a retryable error.
    retrying = _client(cluster, retries=3)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_outcome, retrying, f"load {i}", 24) for i in range(12)]
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                      if "Qwen2Replica" in a["name"])
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        outcomes = [f.result(timeout=120) for f in futures]
    assert set(outcomes) <= {"ok", 429, 503, "connection"} and "ok" in outcomes, outcomes
    assert _ask(retrying, "after the kill")[1].choices[0].text


def _outcome(client, prompt: str, tokens: int):
    import openai

    try:
        _ask(client, prompt, tokens)
        return "ok"
    except openai.APIStatusError as error:
        return error.status_code
    except openai.APIConnectionError:
        return "connection"
