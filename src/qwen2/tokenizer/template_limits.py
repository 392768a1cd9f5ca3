"""Bounds on chat template rendering: output size, work (loop iterations, calls, operators) and time.

A template ships with a checkpoint, and a server renders it on its clients' inputs, so a template with
nested `range(100000)` loops or one that builds a 10 GB string must fail fast with a clear error instead
of running until memory runs out (jinja2's sandbox bounds each `range` but not their product, and not
string sizes). The sandbox routes every call and the intercepted operators through its environment,
which is where the budget is charged; the budget itself is per render (a context variable), so threads
of a server rendering at once do not share it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import time
from collections.abc import Iterator
from typing import Any

MAX_RENDERED_CHARS = 10_000_000  # ~40x the longest Qwen2 context spelled out; any string a template builds too
MAX_TEMPLATE_STEPS = 5_000_000  # loop iterations over range(), calls, filters and operators (~2 s)
MAX_RENDER_SECONDS = 30.0
_MAX_RANGE = 100_000  # per range(), as jinja2's sandbox
# A width or precision of 10^7 or more in a %-format or a str.format spec (checked before formatting).
_PERCENT_WIDTH = re.compile(r"%[-#0 +]*(\d*\.)?\d{8,}")
_FORMAT_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\d{8,}[^{}]*\}")


class ChatTemplateError(ValueError):
    """A chat template failed in a way that is not a jinja2 template error (jinja2's own, such as a syntax
    error or `raise_exception`, propagate as in transformers): a division by zero, a bad index, ..."""


class ChatTemplateLimitError(ChatTemplateError):
    """Rendering a chat template went past a bound; the message names the bound."""


class _Budget:
    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def charge(self, steps: int = 1) -> None:
        self.steps += steps
        if self.steps > MAX_TEMPLATE_STEPS:
            raise ChatTemplateLimitError(f"the chat template did more than {MAX_TEMPLATE_STEPS:,} loop iterations, "
                                         f"calls and operations: it is refused as runaway")
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(f"rendering the chat template took more than {MAX_RENDER_SECONDS:g} s: "
                                         f"it is refused as runaway")


_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("qwen2_template_budget", default=None)


def _charge(steps: int = 1) -> None:
    budget = _current.get()
    if budget is not None:
        budget.charge(steps)


def check_size(length: int, what: str = "a string") -> None:
    if length > MAX_RENDERED_CHARS:
        raise ChatTemplateLimitError(f"the chat template builds {what} of {length:,} characters or items, more than "
                                     f"the {MAX_RENDERED_CHARS:,} allowed")


def _check_arguments(args: tuple, kwargs: dict) -> None:
    """Refuse, before the call, arguments that ask for a huge result (`'x'.center(10**10)`, widths in format
    strings): checking the result afterwards would be too late."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDERED_CHARS:
            raise ChatTemplateLimitError(f"the chat template passes {value:,} to a call; numbers above "
                                         f"{MAX_RENDERED_CHARS:,} are refused as sizes")


def _sized(result: Any) -> Any:
    if isinstance(result, (str, list, tuple, dict)):
        check_size(len(result))
    return result


class _CountedRange:
    """`range()` for templates: each element taken costs a step, so nested loops are bounded as a whole."""

    def __init__(self, *args: int) -> None:
        self.range = range(*args)
        if len(self.range) > _MAX_RANGE:
            raise ChatTemplateLimitError(f"range{args} has {len(self.range):,} items; at most {_MAX_RANGE:,}")

    def __iter__(self) -> Iterator[int]:
        for value in self.range:
            _charge()
            yield value

    def __len__(self) -> int:
        return len(self.range)

    def __getitem__(self, index: Any) -> Any:
        return self.range[index]


def bounded_environment(base: type, **options: Any) -> Any:
    """An instance of a subclass of the sandbox `base` that charges the budget on every call, filter and
    intercepted operator, and refuses huge sizes before they are allocated."""

    class Bounded(base):  # type: ignore[misc, valid-type]
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _charge()
            _check_arguments(args, kwargs)
            bound = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in a function
            if getattr(bound, "__name__", None) in ("format", "format_map") and isinstance(
                    getattr(bound, "__self__", None), str):
                _check_format(_FORMAT_WIDTH, bound.__self__)
            return _sized(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _charge()
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                        check_size(len(seq) * times)
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 \
                    and isinstance(left, (int, float)) and abs(left) > 1:
                raise ChatTemplateLimitError(f"the chat template raises {left!r} to the power {right!r}; "
                                             f"exponents above 64 are refused")
            elif operator == "%" and isinstance(left, str):
                _check_format(_PERCENT_WIDTH, left)
                if "*" in left:  # widths taken from the arguments
                    _check_arguments(right if isinstance(right, tuple) else (right,), {})
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                check_size(len(left) + len(right))
            return super().call_binop(context, operator, left, right)

    env = Bounded(**options)
    env.filters = {name: _bounded_filter(function) for name, function in env.filters.items()}
    env.globals["range"] = _CountedRange
    del env.globals["lipsum"]  # lipsum(n) makes n paragraphs in one call; no chat template uses it
    return env


def _check_format(pattern: re.Pattern, text: str) -> None:
    if pattern.search(text):
        raise ChatTemplateLimitError("the chat template formats with a width or precision of 10^7 or more")


def _bounded_filter(function: Any) -> Any:
    @functools.wraps(function)  # keeps jinja2's pass_context / pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _charge()
        _check_arguments(args[1:], kwargs)
        if function.__name__ == "do_format" and isinstance(args[0], str):
            _check_format(_PERCENT_WIDTH, args[0])
        return _sized(function(*args, **kwargs))

    return bounded


@contextlib.contextmanager
def budget() -> Iterator[None]:
    """A fresh budget for the renders inside the block."""
    token = _current.set(_Budget())
    try:
        yield
    finally:
        _current.reset(token)


def render_bounded(compiled: Any, parts: list[str] | None = None, /, **variables: Any) -> str:
    """`compiled.render(**variables)` within the bounds, the output's size checked as it streams out. The
    chunks are collected in `parts` (a caller may watch them grow: the `{% generation %}` tracking does)."""
    import jinja2  # present: `compiled` is a jinja2 template

    with budget():
        parts, length = ([] if parts is None else parts), 0
        try:
            for part in compiled.generate(**variables):
                length += len(part)
                check_size(length, "an output")
                _charge()
                parts.append(part)
        except RecursionError:  # a macro calling itself without end
            raise ChatTemplateLimitError("the chat template recursed too deeply (a macro calling itself without "
                                         "end?)") from None
        except (ValueError, OSError, jinja2.TemplateError):
            raise
        except Exception as err:  # the template's own bug (1 / 0, an int indexed, ...), not an internal error
            raise ChatTemplateError(f"the chat template failed: {type(err).__name__}: {err}") from err
        return "".join(parts)


def compile_source(env: Any, source: str) -> Any:
    """`env.from_string(source)`; jinja2 turns a few misplaced tags into Python that does not compile."""
    try:
        return env.from_string(source)
    except SyntaxError as err:
        raise ChatTemplateError(f"the chat template does not compile: {err}") from None
