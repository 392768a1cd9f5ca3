"""What the engine hands back: per-request snapshots in vLLM's shape (RequestOutput of CompletionOutputs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """The log-probability of one token, and its rank among the vocabulary (1 = most likely)."""

    token_id: int
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    """One of a request's `n` samples. `text` and `token_ids` are cumulative and only ever grow; text that
    could still become a stop string is held back until it cannot."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "timeout"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per generated token: chosen + top-k
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's arrival, first generated token and end."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """A snapshot of one request: its prompt, its `n` completions so far, and whether it is finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    metrics: RequestMetrics
