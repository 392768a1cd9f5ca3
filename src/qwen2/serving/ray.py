"""Engine replicas behind Ray Serve: `qwen2 serve --replicas N`, or `build_app(...)` for `serve.run` on a
cluster of your own. Needs the `ray` extra (pip install "qwen2[ray]").

Two deployments, the shape of Ray Serve LLM's OpenAI apps: `Qwen2Ingress` takes every HTTP request from
Ray's proxy and hands it to one `Qwen2Replica`, which runs this package's own OpenAI app (validation,
errors, SSE) on its engine, so a replica answers exactly as `qwen2 serve` does. Between them:
- backpressure: each replica takes `max_ongoing_requests` at once; beyond that Ray queues up to
  `max_queued_requests` per ingress, and more are refused with 429 and Retry-After (OpenAI's rate-limit shape);
- prefix affinity: `PrefixAffinityRouter` sends requests that share a prompt's beginning (a conversation's
  system prompt and first turn) to the same replica by rendezvous hashing, so its prefix cache serves them;
  when that replica is full, Ray's router falls back to the others;
- failures: a replica that dies before answering turns into 503 with Retry-After (the `openai` client
  retries it on another replica); one that dies while streaming closes the stream (a connection error the
  client also retries); Ray Serve starts a replacement.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("qwen2.serving")

_PREFIX_CHARS = 512  # how much of a prompt decides its replica


def _require_ray() -> Any:
    try:
        from ray import serve
    except ImportError as missing:
        raise ImportError(f'{missing}; replicas need Ray Serve: pip install "qwen2[ray]"') from None
    return serve


@dataclass
class ServeRequest:
    """One HTTP request as the ingress passes it on. `prompt` holds the beginning of the request's text for
    routing (named as Ray Serve LLM's routers look for it)."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str | None = None


def routing_prefix(body: bytes) -> str | None:
    """The text that decides a request's replica: the completion prompt, or the chat's messages, cut to
    their first `_PREFIX_CHARS` characters; None when the body has neither."""
    try:
        request = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    text = request.get("prompt")
    if text is None and isinstance(request.get("messages"), list):
        text = json.dumps(request["messages"][:2], sort_keys=True)  # the system prompt and the first turn
    if text is None:
        return None
    return (text if isinstance(text, str) else json.dumps(text))[:_PREFIX_CHARS]


class Qwen2Replica:
    """One engine and this package's OpenAI app over it, called with `ServeRequest`s; streams the ASGI
    response: first {"status", "headers"}, then the body's chunks."""

    def __init__(self, model: str, served_model_name: str, dtype: str = "bfloat16", quantization: str | None = None,
                 threads: int | None = None, api_key: str | None = None, **engine_options: Any) -> None:
        import torch

        from qwen2.serving.app import ServerState, Served, create_app
        from qwen2.serving.async_engine import AsyncLLMEngine
        from qwen2.serving.engine import LLMEngine

        if threads is not None:
            torch.set_num_threads(threads)
        engine = LLMEngine.from_pretrained(model, quantization=quantization, dtype=dtype, **engine_options)
        self.state = ServerState(model_name=served_model_name, api_key=api_key)
        self.state.served = Served(AsyncLLMEngine(engine), served_model_name)
        self.app = create_app(self.state)
        # Which replica answered, as a response header (tests and load balancers read it).
        self.replica_header = (b"x-qwen2-replica", _require_ray().get_replica_context().replica_id.unique_id.encode())

    async def __call__(self, request: ServeRequest) -> AsyncIterator[Any]:
        chunks: asyncio.Queue = asyncio.Queue()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
                 "query_string": request.query, "headers": request.headers, "client": None, "server": None,
                 "root_path": ""}
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects from inside a replica
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await chunks.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        try:
            while True:
                message = await chunks.get()
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "headers": [*message.get("headers", []), self.replica_header]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        break
        finally:
            if not task.done():
                task.cancel()


class Qwen2Ingress:
    """Ray Serve's HTTP entry: every request goes to a replica through the deployment handle."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas

    async def __call__(self, request: Any) -> Any:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
        from starlette.responses import JSONResponse, StreamingResponse

        from qwen2.serving.errors import QueueFullError
        from qwen2.serving.http_errors import RETRY_AFTER_SECONDS, APIError, to_api_error

        body = await request.body()
        message = ServeRequest(request.method, request.url.path, request.url.query.encode(),
                               list(request.headers.raw), body, routing_prefix(body))
        stream = self.replicas.options(stream=True).remote(message)
        try:
            head = await stream.__anext__()
        except BackPressureError as error:
            api_error = to_api_error(QueueFullError(f"all replicas are busy: {error}"))
            return JSONResponse(api_error.body(), status_code=api_error.status, headers=api_error.headers)
        except (RayActorError, DeploymentUnavailableError) as error:
            logger.warning("a replica failed before answering: %s", str(error).splitlines()[0])
            api_error = APIError(503, "the replica serving this request stopped; retry",
                                 type="service_unavailable_error", code="replica_unavailable",
                                 headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            return JSONResponse(api_error.body(), status_code=api_error.status, headers=api_error.headers)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head["headers"]
                   if k.lower() not in (b"content-length", b"transfer-encoding")}
        media_type = headers.pop("content-type", None)
        return StreamingResponse(_body(stream), status_code=head["status"], headers=headers, media_type=media_type)


async def _body(stream: Any) -> AsyncIterator[bytes]:
    """The replica's chunks; if it dies mid-response the error ends the stream (the client sees the
    connection close and may retry)."""
    async for chunk in stream:
        yield chunk


def build_app(model: str, *, served_model_name: str | None = None, replicas: int = 2,
              max_ongoing_requests: int = 16, max_queued_requests: int = 64, cpus_per_replica: float = 1.0,
              autoscaling: dict[str, Any] | None = None, **replica_options: Any) -> Any:
    """The Ray Serve application: `serve.run(build_app("Qwen/Qwen2.5-0.5B-Instruct", replicas=4))`.
    `autoscaling` (Ray's autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 8,
    "target_ongoing_requests": 8}) replaces the fixed `replicas`; `replica_options` go to `Qwen2Replica`
    (dtype, quantization, threads, api_key, and EngineConfig fields such as kv_cache_memory)."""
    serve = _require_ray()
    from ray.serve.config import RequestRouterConfig

    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    engine = serve.deployment(
        Qwen2Replica, name="Qwen2Replica", max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests, ray_actor_options={"num_cpus": cpus_per_replica},
        request_router_config=RequestRouterConfig(
            request_router_class="qwen2.serving.ray_router:PrefixAffinityRouter"), **scale,
    ).bind(model, served_model_name or model, **replica_options)
    ingress = serve.deployment(Qwen2Ingress, name="Qwen2Ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max(1000, 4 * max_queued_requests))
    return ingress.bind(engine)


def run_replicas(model: str, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                 **options: Any) -> None:
    """`qwen2 serve --replicas N`: join the Ray cluster at `address` (default: start a local one), serve
    `build_app(model, **options)` on host:port until SIGTERM or Ctrl-C, then shut Serve (and a local
    cluster) down."""
    import signal
    import threading

    import ray

    serve = _require_ray()
    ray.init(address=address, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(model, **options), name="qwen2", route_prefix="/")
        logger.info("serving %d replicas of %s on http://%s:%d/v1", options.get("replicas", 2), model, host, port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
