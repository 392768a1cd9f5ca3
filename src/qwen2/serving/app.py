"""The OpenAI-compatible HTTP server: FastAPI routes kept thin over the engine (chat.py and completions.py do the
work), an ASGI gate in front (API key, body size limit, one log line and the metrics of every request), and
errors in OpenAI's shape from one table (http_errors.py). The engine loads after the server starts listening, so
clients get 503 (not a refused connection) while it loads and while the server shuts down."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as missing:
    raise ImportError(f'the HTTP server needs the "serve" extra ({missing.name} is missing): '
                      'pip install "qwen2[serve]"') from missing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from qwen2.serving.async_engine import AsyncLLMEngine
from qwen2.serving.chat import chat_completion, template_messages
from qwen2.serving.completions import completion
from qwen2.serving.handling import Served, check_token_ids
from qwen2.serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
                                    TokenizeRequest)
from qwen2.serving.http_errors import (APIError, body_too_large, model_not_found, to_api_error, unauthorized,
                                       unavailable, validation_error)
from qwen2.serving.metrics import RequestRecord, ServerMetrics

logger = logging.getLogger("qwen2.serving")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_OPEN_PATHS = ("/health", "/metrics")  # no API key needed, as in vLLM
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics")


@dataclass
class ServerState:
    """What the routes read: the engine once loaded, and whether the server is loading or stopping."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace: float = 30.0
    served: Served | None = None
    load_error: str | None = None
    shutting_down: bool = False
    on_load_error: Callable[[BaseException], None] | None = None
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: self.served.engine.stats() if self.served else None)

    def ready(self) -> Served:
        if self.shutting_down:
            raise unavailable("the server is shutting down")
        if self.served is None:
            raise unavailable(f"the model failed to load: {self.load_error}" if self.load_error
                              else "the model is loading; retry shortly")
        return self.served

    def check_model(self, name: str | None) -> Served:
        served = self.ready()
        if name is not None and name != served.model_name:
            raise model_not_found(name)
        return served


def _request_fields() -> frozenset[str]:
    """Every field name of the request models: pydantic's error locations are reduced to these."""
    from pydantic import BaseModel

    from qwen2.serving import protocol

    names: set[str] = set()
    for value in vars(protocol).values():
        if isinstance(value, type) and issubclass(value, BaseModel):
            names.update(value.model_fields)
    return frozenset(names)


async def _send_error(send: Callable[..., Any], error: APIError) -> None:
    import json

    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Gate:
    """ASGI middleware: the API key, the body size limit (the body is read here, once, and replayed), and the
    request's log line and metrics, written when its response (streamed or not) has ended."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    def _authorised(self, scope: dict[str, Any]) -> bool:
        if self.state.api_key is None or scope["path"] in _OPEN_PATHS:
            return True
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.state.api_key.encode())

    async def _read_body(self, scope: dict[str, Any], receive: Callable[..., Any]) -> bytes | APIError | None:
        limit = self.state.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return body_too_large(limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(arrival=time.time())
        scope.setdefault("state", {})["record"] = record
        status = [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive) if self._authorised(scope) else unauthorized()
            if isinstance(body, APIError):
                await _send_error(sending, body)
                return
            if body is None:  # the client left while sending its body
                return
            replayed = [False]

            async def replay() -> dict[str, Any]:
                if replayed[0]:
                    return await receive()
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, sending)
        finally:
            self._log(scope, status[0] or 499, record)

    def _log(self, scope: dict[str, Any], status: int, record: RequestRecord) -> None:
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        self.state.metrics.observe(route, status, record)
        if route in ("/metrics", "/health"):
            return
        ttft = f"{record.ttft * 1000:.0f}ms" if record.ttft is not None else "-"
        logger.info("%s %s %s %d in=%d out=%d ttft=%s duration=%.0fms", record.request_id, scope["method"],
                    scope["path"], status, record.prompt_tokens, record.completion_tokens, ttft,
                    (time.time() - record.arrival) * 1000)


def create_app(state: ServerState, engine_factory: Callable[[], AsyncLLMEngine] | None = None) -> Any:
    """The ASGI app. With `engine_factory`, the engine is built on a worker thread once the server is up;
    otherwise `state.served` must already be set. Route annotations are resolved in this module's globals
    (FastAPI reads them), so their types are imported at the top."""
    fields = _request_fields()

    async def load() -> None:
        try:
            engine = await asyncio.to_thread(engine_factory)  # type: ignore[arg-type]
            state.served = Served(engine, state.model_name)
            logger.info("model %s loaded; serving", state.model_name)
        except Exception as error:
            logger.error("loading the model failed: %s", error, exc_info=error)
            state.load_error = str(error)
            if state.on_load_error is not None:
                state.on_load_error(error)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loading = asyncio.create_task(load()) if engine_factory is not None and state.served is None else None
        yield
        state.shutting_down = True
        if loading is not None and not loading.done():
            await asyncio.gather(loading, return_exceptions=True)  # a thread cannot be cancelled
        if state.served is not None:
            await state.served.engine.shutdown(state.shutdown_grace)

    app = FastAPI(title="qwen2", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(list(error.errors()), fields))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return await api_error(request, APIError(error.status_code, str(error.detail), code=code))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        return await api_error(request, to_api_error(error))

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest) -> Response:
        served = state.check_model(body.model)
        return await chat_completion(request, body, served, request.state.record)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        served = state.check_model(body.model)
        return await completion(request, body, served, request.state.record)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = state.ready()
        return ModelList(data=[ModelCard(id=served.model_name, max_model_len=served.max_model_len)]).model_dump()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        served = state.check_model(name)
        return ModelCard(id=served.model_name, max_model_len=served.max_model_len).model_dump()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        served = state.check_model(body.model)
        if body.messages is not None:
            tokens = served.tokenizer.apply_chat_template(
                template_messages(body.messages), add_generation_prompt=body.add_generation_prompt, tokenize=True,
                return_dict=False, sanitize_control_tokens=True)
        else:
            tokens = served.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        served = state.check_model(body.model)
        check_token_ids(body.tokens, served.vocab_size, "tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.get("/health")
    async def health() -> Response:
        state.ready()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        payload, content_type = state.metrics.render()
        return PlainTextResponse(payload, media_type=content_type)

    return _Gate(app, state)
