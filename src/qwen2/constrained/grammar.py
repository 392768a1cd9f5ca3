"""Turning a JSON schema, a regex, a Lark grammar or a list of choices into one validated llguidance grammar.

Problems are found here, before any token is generated: an invalid schema, regex or grammar raises a
ValueError with llguidance's message; compilation runs under llguidance's resource limits and a wall-clock
bound, so a pathological schema is refused instead of stalling the caller.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Sequence
from typing import Any

from qwen2.constrained.engine import llguidance

# JSON as a model writes it ({"a": 1, "b": [2, 3]}) and nothing else: flexible whitespace would let a weak
# model pad forever between tokens without ever closing the object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
DEFAULT_COMPILE_TIMEOUT = 10.0


def grammar_source(
    json_schema: dict[str, Any] | str | bool | None = None,
    regex: str | None = None,
    grammar: str | None = None,
    choice: Sequence[str] | None = None,
) -> tuple[str, str]:
    """(kind, llguidance grammar text) for exactly one of the four kinds of constraint (not yet validated)."""
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                      ("choice", choice)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of json_schema=, regex=, grammar= or choice= (got {given or 'none'}).")
    return given[0], _source(llguidance(), json_schema, regex, grammar, choice)


def _source(llg: Any, json_schema: Any, regex: Any, grammar: Any, choice: Any) -> str:
    if json_schema is not None:
        if isinstance(json_schema, bool):
            json_schema = {} if json_schema else {"not": {}}
        try:
            return llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"json_schema is not a JSON object: {exc}") from None
    if regex is not None:
        if not isinstance(regex, str):
            raise ValueError(f"regex must be a string, got {type(regex).__name__}.")
        return llg.LLMatcher.grammar_from_regex(regex)
    if grammar is not None:
        if not isinstance(grammar, str):
            raise ValueError(f"grammar must be a Lark grammar string, got {type(grammar).__name__}.")
        return llg.LLMatcher.grammar_from_lark(grammar)
    if isinstance(choice, str) or not choice or not all(isinstance(c, str) and c for c in choice):
        raise ValueError(f"choice must be a non-empty list of non-empty strings, got {choice!r}.")
    return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))


def compile_grammar(
    ll_tokenizer: Any,
    json_schema: dict[str, Any] | str | bool | None = None,
    regex: str | None = None,
    grammar: str | None = None,
    choice: Sequence[str] | None = None,
    timeout: float = DEFAULT_COMPILE_TIMEOUT,
) -> Any:
    """A fresh `LLMatcher` at the start of the grammar, or a ValueError naming what is wrong with it."""
    kind, source = grammar_source(json_schema, regex, grammar, choice)
    llg = llguidance()
    # llguidance builds the lexer and checks the grammar with the GIL released, under its fuel limits; the
    # timeout bounds what the limits do not (the worker finishes in the background if it overruns).
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        matcher = pool.submit(llg.LLMatcher, ll_tokenizer, source, log_level=0).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise ValueError(f"The {kind} took longer than {timeout:g} s to compile; simplify it.") from None
    finally:
        pool.shutdown(wait=False)
    if matcher.is_error():
        raise ValueError(f"Invalid {kind}: {matcher.get_error()}")
    return matcher
