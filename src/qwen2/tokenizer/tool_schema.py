"""Tool schemas from Python functions: `apply_chat_template(tools=[my_function])`.

A function with type hints and a Google-style docstring becomes the JSON schema a chat template
renders, the same one transformers builds (reference: `get_json_schema` in transformers'
`utils/chat_template_utils.py`): the docstring's first section describes the function, its `Args:`
block each argument (a trailing `(choices: [...])` becomes an `enum`), an optional `Returns:` block
the return value. Hints map to JSON types: int/float/str/bool/None, list[X] -> array of X,
tuple[X, Y] -> array with prefixItems, dict[str, X] -> object with additionalProperties, Literal and
Enum -> enum, Optional/Union -> a type list (or anyOf) marked nullable. Anything else is refused, since
guessing the JSON a custom class expects would describe the tool wrongly.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["DocstringParsingException", "TypeHintParsingException", "get_json_schema"]


class TypeHintParsingException(Exception):
    """A parameter's type hint has no JSON schema equivalent (or is missing)."""


class DocstringParsingException(Exception):
    """The function's docstring is missing, or does not describe every argument."""


_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BARE = {**{kind: {"type": name} for kind, name in _SCALARS.items()},
         list: {"type": "array"}, tuple: {"type": "array"}, dict: {"type": "object"}}

# The docstring's sections. Argument lines are `name: text` or `name (type): text`; a description runs
# on over following lines until the next argument at the same (or a shallower) indentation.
_DESCRIPTION = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_ARGS = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
_ARG = re.compile(
    r"(?:^|\n)([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*(.*?)\s*"
    r"(?=\n(?!\1[ \t])[ \t]*\w+(?:[ \t]*\([^()\n]*\))?:|\Z)",
    re.DOTALL,
)
_RETURNS = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)


def _bare_type(hint: Any) -> dict[str, Any] | None:
    if hint is Any:
        return {}
    if hint in _BARE:
        return dict(_BARE[hint])
    # Media inputs of multimodal templates; their modules are only looked at if the caller already loaded them.
    torch = sys.modules.get("torch")
    if torch is not None and hint is torch.Tensor:
        return {"type": "audio"}
    pil_image = sys.modules.get("PIL.Image")
    if pil_image is not None and hint is pil_image.Image:
        return {"type": "image"}
    return None


def _enum(values: list[Any], where: str) -> dict[str, Any]:
    if any(type(value) not in _SCALARS for value in values):
        raise TypeHintParsingException(
            f"{where} has values that are not JSON scalars (int, float, str, bool or None): {values}"
        )
    kinds = list(dict.fromkeys(_SCALARS[type(value)] for value in values))  # each JSON type once, first seen first
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _hint_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of one type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None:
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            values = [member.value for member in hint]
            if not values:
                raise TypeHintParsingException(f"the Enum {hint.__name__} has no members, so nothing can match it")
            return _enum(values, f"the Enum {hint.__name__}")
        schema = _bare_type(hint)
        if schema is None:
            raise TypeHintParsingException(
                f"cannot convert the type hint {hint!r} to a JSON schema: supported hints are int, float, str, "
                "bool, None, Any, Enum classes, Literal, and list/tuple/dict/Union of those. For anything else, "
                "write the tool's JSON schema by hand and pass that instead of the function"
            )
        return schema
    if origin is typing.Union or origin is types.UnionType:
        members = [_hint_schema(arg) for arg in args if arg is not type(None)]
        if len(members) == 1:
            schema = members[0]
        elif all(m.keys() == {"type"} and isinstance(m["type"], str) for m in members):
            names = sorted({m["type"] for m in members})  # list | tuple both give "array": keep it once
            schema = {"type": names[0] if len(names) == 1 else names}
        else:
            schema = {"anyOf": members}  # members with items/enum/... would lose them in a type list
        if type(None) in args:
            schema["nullable"] = True
        return schema
    if origin is typing.Literal and args:
        return _enum(list(args), "a Literal")
    if origin is list:
        return {"type": "array", "items": _hint_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        shown = str(hint).replace("typing.", "")
        if len(args) == 1:
            raise TypeHintParsingException(
                f"the type hint {shown} is a one-element tuple: use list[...] if it can hold more than one "
                "element, or the element's own type if it cannot"
            )
        if ... in args:
            raise TypeHintParsingException(f"the type hint {shown} uses '...': use list[...] for variable length")
        return {"type": "array", "prefixItems": [_hint_schema(arg) for arg in args]}
    if origin is dict:
        schema = {"type": "object"}  # JSON object keys are strings; only the values' type can be given
        if len(args) == 2:
            schema["additionalProperties"] = _hint_schema(args[1])
        return schema
    raise TypeHintParsingException(f"cannot convert the type hint {hint!r} to a JSON schema")


def _parameters_schema(func: Callable[..., Any], name: str) -> dict[str, Any]:
    hints = typing.get_type_hints(func)
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())
    # An unannotated first `self`/`cls` is the method's receiver, not an argument the model fills in.
    receiver = None
    if parameters and parameters[0].name in ("self", "cls") and parameters[0].annotation is inspect.Parameter.empty:
        receiver = parameters[0].name
    required = []
    for parameter in parameters:
        if parameter.name == receiver:
            continue
        if parameter.annotation is inspect.Parameter.empty:
            raise TypeHintParsingException(f"Argument {parameter.name} is missing a type hint in function {name}")
        if parameter.default is inspect.Parameter.empty:
            required.append(parameter.name)
    properties: dict[str, Any] = {}
    for key, hint in hints.items():
        if key == receiver:
            continue
        if key == "return":
            try:  # the model never writes the return value: an unconvertible return hint is left out, not fatal
                properties[key] = _hint_schema(hint)
            except TypeHintParsingException:
                pass
        else:
            properties[key] = _hint_schema(hint)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _parse_docstring(doc: str) -> tuple[str | None, dict[str, str], str | None]:
    description = _DESCRIPTION.search(doc)
    args = _ARGS.search(doc)
    returns = _RETURNS.search(doc)
    arguments: dict[str, str] = {}
    if args is not None:
        block = "\n".join(line for line in args.group(1).split("\n") if line.strip())
        arguments = {m[1]: re.sub(r"\s*\n+\s*", " ", m[2].strip()) for m in _ARG.findall(block)}
    return (description.group(1).strip() if description else None, arguments,
            returns.group(1).strip() if returns else None)


def get_json_schema(func: Callable[..., Any]) -> dict[str, Any]:
    """`{"type": "function", "function": {name, description, parameters[, return]}}` for a typed,
    Google-style documented function (or method), as chat templates expect tools to be described."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise DocstringParsingException(f"Cannot generate JSON schema for {name} because it has no docstring!")
    description, arguments, returns = _parse_docstring(doc.strip())
    parameters = _parameters_schema(func, name)
    return_schema = parameters["properties"].pop("return", None)
    if return_schema is not None and returns is not None:
        return_schema["description"] = returns
    for argument, schema in parameters["properties"].items():
        if argument not in arguments:
            raise DocstringParsingException(
                f"Cannot generate JSON schema for {name} because the docstring has no description for the "
                f"argument '{argument}'"
            )
        text = arguments[argument]
        choices = _CHOICES.search(text)
        if choices:
            try:
                values = json.loads(choices.group(1))
            except json.JSONDecodeError as exc:
                raise DocstringParsingException(
                    f"the (choices: ...) of argument '{argument}' of {name} is not a JSON list: {exc}"
                ) from None
            schema["enum"] = [value.strip() if isinstance(value, str) else value for value in values]
            text = text[:choices.start()].strip()
        schema["description"] = text
    function: dict[str, Any] = {"name": name, "description": description, "parameters": parameters}
    if return_schema is not None:
        function["return"] = return_schema
    return {"type": "function", "function": function}
