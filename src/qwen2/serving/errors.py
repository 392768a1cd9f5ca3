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


class ConstraintError(EngineError, ValueError):
    """A request's structured_outputs is invalid, unsupported or too slow to compile (HTTP 400, naming the field
    it came from). `reason` is the problem without the field's name."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"structured_outputs: {reason}")
        self.reason = reason
