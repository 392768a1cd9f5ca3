"""SamplingParams: one request's decoding settings, with vLLM's names and meanings, validated on creation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Below this temperature a request is decoded greedily (vLLM's threshold).
GREEDY_TEMPERATURE = 1e-5


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's `StructuredOutputsParams`): exactly one of a JSON schema (`json`, a
    dict or its JSON text), a regex, a list of literal `choice`s, a Lark `grammar` (as llguidance takes it), or
    `json_object=True` (any JSON object). The engine compiles it when the request is added."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar or json_object "
                             f"(got {', '.join(given) or 'none'}).")
        if self.choice is not None:
            self.choice = list(self.choice)

    def constraint(self) -> dict[str, Any]:
        """The keyword arguments of `qwen2.constrained.compile_constraint` for this constraint."""
        if self.json_object:
            return {"json_schema": {"type": "object"}}
        if self.json is not None:
            return {"json_schema": self.json}
        if self.regex is not None:
            return {"regex": self.regex}
        if self.choice is not None:
            return {"choice": self.choice}
        return {"grammar": self.grammar}


@dataclass
class SamplingParams:
    """How to pick each new token of one request and when to stop.

    `temperature=0` is greedy; `top_k` 0 or -1 and `top_p=1` switch those filters off; `seed` makes the
    request's samples reproducible whatever else runs beside it; `stop` strings are cut from the text;
    `logprobs=k` returns the chosen token's and the top-k tokens' logprobs per generated token (0: only the
    chosen one); `prompt_logprobs=k` the same for the prompt tokens; `structured_outputs` constrains the output
    to a JSON schema, regex, grammar or choices. Bad values raise ValueError naming the field.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = _parse_logit_bias(self.logit_bias)
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def _validate(self) -> None:
        _integer("n", self.n, minimum=1)
        _number("temperature", self.temperature, minimum=0.0)
        _number("top_p", self.top_p, minimum=0.0, maximum=1.0)
        if self.top_p <= 0.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _integer("top_k", self.top_k, minimum=0)
        _number("min_p", self.min_p, minimum=0.0, maximum=1.0)
        _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}.")
        _number("presence_penalty", self.presence_penalty, minimum=-2.0, maximum=2.0)
        _number("frequency_penalty", self.frequency_penalty, minimum=-2.0, maximum=2.0)
        if self.seed is not None:
            _integer("seed", self.seed)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}.")
        for token in self.stop_token_ids:
            _integer("stop_token_ids", token, minimum=0)
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, minimum=1)
        _integer("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens}).")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, minimum=0)
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, minimum=0)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}.")


def _parse_logit_bias(bias: dict) -> dict[int, float]:
    """Token ids may arrive as strings (OpenAI's JSON keys); biases are clamped to [-100, 100] as OpenAI does."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}.")
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}.") from None
        if token < 0:
            raise ValueError(f"logit_bias token ids must be >= 0, got {token}.")
        _number(f"logit_bias[{token}]", value)
        parsed[token] = min(100.0, max(-100.0, float(value)))
    return parsed


def _integer(name: str, value: object, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def _number(name: str, value: object, minimum: float | None = None, maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}.")
