"""Model output containers with transformers' `ModelOutput` access rules.

An output is a dataclass that also behaves as an ordered dict of its non-None fields, so `out.logits`,
`out["logits"]`, `out[0]` and `out.to_tuple()` all work as with transformers 5.x. transformers 5.x renamed the
cache field `past_key_values` to `cache`; both names are accepted here (attribute, key, `in`, `get`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch

_CACHE_ALIASES = ("past_key_values", "cache_params")


def _canonical(key: str) -> str:
    return "cache" if key in _CACHE_ALIASES else key


class ModelOutput(OrderedDict):
    """Base class: an ordered dict of the non-None dataclass fields, indexable by name or position."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                super().__setitem__(field.name, value)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return dict(self.items())[_canonical(key)]
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        key = _canonical(key)
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        name = _canonical(name)
        if value is not None and name in {field.name for field in fields(self)}:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(_canonical(key) if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(_canonical(key), default)

    @property
    def past_key_values(self) -> Any:
        """transformers 4.x name of the `cache` field."""
        return getattr(self, "cache", None)

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-None fields in declaration order."""
        return tuple(self[key] for key in self.keys())

    def __reduce__(self):
        callable_, _args, *rest = super().__reduce__()
        return (callable_, tuple(getattr(self, field.name) for field in fields(self)), *rest)

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"{type(self).__name__} does not support deleting items.")

    def pop(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{type(self).__name__} does not support pop().")

    def setdefault(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{type(self).__name__} does not support setdefault().")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support update().")


def _accepts_past_key_values(cls: type) -> type:
    """Let `Output(past_key_values=...)` construct the `cache` field, as transformers still allows."""
    init = cls.__init__

    def __init__(self, *args: Any, past_key_values: Any = None, **kwargs: Any) -> None:
        if past_key_values is not None:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass either `cache` or `past_key_values`, not both.")
            kwargs["cache"] = past_key_values
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


@_accepts_past_key_values
@dataclass(eq=False)
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@_accepts_past_key_values
@dataclass(eq=False)
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@_accepts_past_key_values
@dataclass(eq=False)
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
