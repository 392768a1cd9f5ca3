"""Every error the HTTP server returns, in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`),
with the exception-to-status mapping in one table (STYLE: no "any exception -> 404")."""

from __future__ import annotations

import json
import logging
from typing import Any

from qwen2.serving.errors import ContextLengthExceededError, EngineDeadError, QueueFullError

logger = logging.getLogger("qwen2.serving")

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """A request the server refuses: the status, OpenAI's error type and code, and the field at fault."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# exception type -> (status, OpenAI error type, code, headers). The first matching row wins.
ERROR_TABLE: list[tuple[type[BaseException], int, str, str | None, dict[str, str]]] = [
    (QueueFullError, 429, "rate_limit_error", "rate_limit_exceeded", {"Retry-After": str(RETRY_AFTER_SECONDS)}),
    (ContextLengthExceededError, 400, "invalid_request_error", "context_length_exceeded", {}),
    (EngineDeadError, 503, "service_unavailable_error", "engine_unavailable", {}),
    (ValueError, 400, "invalid_request_error", None, {}),
]


def to_api_error(error: BaseException, param: str | None = None) -> APIError:
    """The APIError for an exception the engine or a handler raised; unknown ones are 500s, logged in full."""
    if isinstance(error, APIError):
        return error
    for kind, status, type_, code, headers in ERROR_TABLE:
        if isinstance(error, kind):
            message = str(error) if param is None or param in str(error) else f"{param}: {error}"
            return APIError(status, message, type=type_, param=param, code=code, headers=headers)
    logger.error("internal error", exc_info=error)
    return APIError(500, "internal server error", type="internal_server_error")


def unauthorized() -> APIError:
    return APIError(401, "missing or invalid API key (send it as 'Authorization: Bearer <key>')",
                    type="authentication_error", code="invalid_api_key")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes", code="request_too_large")


def unavailable(reason: str) -> APIError:
    return APIError(503, reason, type="service_unavailable_error", code="service_unavailable")


def not_supported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by this server", param=param, code="unsupported_parameter")


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _param(loc: tuple[Any, ...], fields: frozenset[str]) -> str | None:
    """OpenAI's spelling of a pydantic location, e.g. ('body', 'messages', 0, 'user', 'content') ->
    'messages[0].content': union-member labels that pydantic inserts are not fields and are dropped."""
    param, previous = "", None
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in fields and not (isinstance(previous, int) and part in _ROLES):  # a message's union tag
            param += f".{part}" if param else part
        previous = part
    return param or None


def validation_error(errors: list[dict[str, Any]], fields: frozenset[str]) -> APIError:
    """The 400 for a body pydantic (via FastAPI) refused: the first error, with its field named."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "the request body is empty; send a JSON object")
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "the request body must be a JSON object")
    param = _param(tuple(first.get("loc", ())), fields)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if "input" in first and first.get("type") != "missing":
        shown = json.dumps(first["input"], default=str)
        message += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return APIError(400, message, param=param)
