"""get_json_schema and apply_chat_template(tools=[function]) against transformers' get_json_schema (the oracle)
on varied typed, Google-documented functions, and the same errors for functions it cannot describe."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pytest
import torch

import qwen2

from qwen2.tokenizer import Qwen2Tokenizer, Qwen2TokenizerFast
from qwen2.tokenizer import tool_schema
from qwen2.tokenizer.tool_schema import get_json_schema

import transformers  # noqa: E402  (the oracle; a test dependency)
from transformers.utils import chat_template_utils as hf_utils  # noqa: E402


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Empty(enum.Enum):
    pass


class Mixed(enum.Enum):
    A = 1
    B = "b"
    C = None


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city.

    Args:
        city: The city to look up, e.g. "Paris"
        unit: The temperature unit (choices: ["celsius", "fahrenheit"])

    Returns:
        A sentence describing the weather.
    """


def multiply(x: float, y: float):
    """
    A function that multiplies two numbers

    Args:
        x: The first number to multiply
        y: The second number to multiply
    """


def search(query: str, limit: Optional[int] = None, tags: list[str] | None = None, exact: bool = False) -> list[dict]:
    """Search the index.

    Searches every document and ranks the hits.

    Args:
        query (str): The text to search for. It may span
            several lines of description.
        limit (int, optional): At most this many hits.
        tags: Only documents carrying all of these tags.
        exact: Match the whole phrase.

    Raises:
        ValueError: on an empty query.
    """


def containers(matrix: list[list[float]], point: tuple[int, int, str], table: dict[str, int], anything: Any,
               plain_list: list, plain_dict: dict, plain_tuple: tuple) -> None:
    """Containers of all kinds.

    Args:
        matrix: Rows of numbers.
        point: x, y and a label.
        table: Counts by name.
        anything: Whatever you like.
        plain_list: An untyped list.
        plain_dict: An untyped dict.
        plain_tuple: An untyped tuple.
    """


def unions(a: Union[int, str], b: int | float | None, c: Union[list[int], str], d: list | tuple,
           e: Optional[Literal["x", "y"]] = None) -> int | str:
    """Unions of basic and structured types.

    Args:
        a: An int or a string.
        b: A number or nothing.
        c: A list of ints or a string.
        d: A list or a tuple.
        e: One of two letters.

    Returns:
        Whatever came in.
    """


def literals(mode: Literal["fast", "slow"], level: Literal[1, 2, 3], mixed: Literal["a", 1, True, None]) -> None:
    """Literal choices.

    Args:
        mode: How fast to go.
        level: How hard to try.
        mixed: A mix of JSON scalars.
    """


def enums(color: Color, level: Level, mixed: Mixed, maybe: Optional[Color] = None) -> Color:
    """Enum classes become the values the model has to write.

    Args:
        color: A color.
        level: A level.
        mixed: Values of several JSON types.
        maybe: Perhaps a color.
    """


def choices_in_description(size: int, drink: str) -> None:
    """Choices given in the docstring.

    Args:
        size: The cup size in ml (choices: [250, 500, 750])
        drink: The drink to pour (CHOICES: ["tea ", " coffee"])
    """


def no_args() -> int:
    """Returns a random number, with no arguments.

    Returns:
        A random number.
    """


def nested_types(config: dict[str, list[tuple[int, float]]], ids: list[Optional[int]]) -> dict[str, Any]:
    """Deeply nested hints.

    Args:
        config: Pairs of numbers by name.
        ids: Ids, some missing.
    """


def unconvertible_return(path: str) -> Path:
    """The return hint is a class JSON cannot describe; it is left out rather than refused.

    Args:
        path: Where to look.
    """


def media(audio: torch.Tensor, prompt: str = "") -> None:
    """Multimodal inputs.

    Args:
        audio: A waveform.
        prompt: What to do with it.
    """


def indented_args(first: str, second: int) -> None:
    """Args with continuation lines indented deeper and a blank line between them.

    Args:
        first: The first one, whose description
            runs on: with a colon inside.

        second: The second one.
    Returns:
        nothing
    """


def keyword_only(a: int, *, b: str = "x", c: bool) -> None:
    """Keyword-only arguments.

    Args:
        a: Positional.
        b: With a default.
        c: Without one.
    """


class Calculator:
    def add(self, a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    @classmethod
    def make(cls, name: str) -> None:
        """Make one.

        Args:
            name: Its name.
        """


GOOD = [get_weather, multiply, search, containers, unions, literals, enums, choices_in_description, no_args,
        nested_types, unconvertible_return, media, indented_args, keyword_only, Calculator().add, Calculator.make]


@pytest.mark.parametrize("func", GOOD, ids=lambda f: f.__name__)
def test_schema_matches_transformers(func):
    assert get_json_schema(func) == hf_utils.get_json_schema(func)
    assert qwen2.get_json_schema is get_json_schema


def no_docstring(x: int) -> None:
    pass


def missing_description(x: int, y: int) -> None:
    """Only one argument is described.

    Args:
        x: The x.
    """


def missing_hint(x, y: int) -> None:
    """A hint is missing.

    Args:
        x: The x.
        y: The y.
    """


def custom_class(where: Path) -> None:
    """A class JSON cannot describe.

    Args:
        where: A path.
    """


def one_tuple(pair: tuple[int]) -> None:
    """A one-element tuple.

    Args:
        pair: One int.
    """


def ellipsis_tuple(values: tuple[int, ...]) -> None:
    """A variable-length tuple.

    Args:
        values: Ints.
    """


def empty_enum(value: Empty) -> None:
    """An enum without members.

    Args:
        value: Nothing can match.
    """


def bad_literal(value: Literal[b"bytes", 1]) -> None:
    """A literal that is not JSON.

    Args:
        value: Bytes.
    """


BAD = [
    (no_docstring, "DocstringParsingException", "no docstring"),
    (missing_description, "DocstringParsingException", "no description for the argument 'y'"),
    (missing_hint, "TypeHintParsingException", "Argument x is missing a type hint"),
    (custom_class, "TypeHintParsingException", "Path"),
    (one_tuple, "TypeHintParsingException", "one-element tuple"),
    (ellipsis_tuple, "TypeHintParsingException", "'...'"),
    (empty_enum, "TypeHintParsingException", "Empty has no members"),
    (bad_literal, "TypeHintParsingException", "not JSON scalars"),
]


@pytest.mark.parametrize("func,kind,message", BAD, ids=[b[0].__name__ for b in BAD])
def test_errors_match_transformers(func, kind, message):
    with pytest.raises(getattr(hf_utils, kind)):
        hf_utils.get_json_schema(func)
    with pytest.raises(getattr(tool_schema, kind), match=message):
        get_json_schema(func)


# ---- through the real Qwen2.5 chat template ------------------------------------------------------
@pytest.mark.parametrize("cls", [Qwen2Tokenizer, Qwen2TokenizerFast], ids=["slow", "fast"])
def test_function_tools_render_like_transformers(tok_dir, cls):
    ours = cls.from_pretrained(tok_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    messages = [{"role": "user", "content": "Weather in Paris, and search for tea?"}]
    tools = [get_weather, search, enums, Calculator().add, {"type": "function", "function": {"name": "noop"}}]
    kwargs = {"add_generation_prompt": True, "tools": tools}
    text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert '"enum": ["celsius", "fahrenheit"]' in text
    assert ours.apply_chat_template(messages, return_dict=False, **kwargs) == \
        hf.apply_chat_template(messages, return_dict=False, **kwargs)
    with pytest.raises(tool_schema.DocstringParsingException, match="no docstring"):
        ours.apply_chat_template(messages, tools=[lambda city: city])
    with pytest.raises(ValueError, match="JSON schemas"):
        ours.apply_chat_template(messages, tools=["get_weather"])
