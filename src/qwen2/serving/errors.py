"""The engine's exceptions. The HTTP server maps each to one status in one table (429, 400, 503)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the serving engine raises on purpose."""


class QueueFullError(EngineError):
    """The waiting queue is at `EngineConfig.max_waiting`; the caller should retry later (HTTP 429)."""


class ContextLengthExceededError(EngineError, ValueError):
    """The prompt plus the requested tokens do not fit in `max_model_len` (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop stopped (it crashed or was shut down); no request can be served (HTTP 503)."""
