"""transformers' Auto* entry points, for the one model type this package implements.

Each class reads the checkpoint's `model_type` and refuses anything but "qwen2" with an error that says what
was found, instead of silently building a Qwen2 model from another architecture's config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qwen2.config import CONFIG_NAME, MODEL_TYPE, Qwen2Config

_HUB_OPTIONS = ("gguf_file", "revision", "cache_dir", "local_files_only", "token")


def _check_model_type(model_type: Any, source: Any) -> None:
    if model_type != MODEL_TYPE:
        raise ValueError(f"{source} is a {model_type!r} model, but qwen2 only implements model_type="
                         f"{MODEL_TYPE!r} (Qwen2 / Qwen2.5); use transformers for other architectures")


def _peek_model_type(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> None:
    """Read only config.json's model_type, so a foreign checkpoint fails before any weights are touched."""
    from qwen2.loading.hub import resolve_model_dir

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix != ".gguf":
        config_file = path
    else:
        options = {key: kwargs[key] for key in _HUB_OPTIONS if key in kwargs}
        config_file = resolve_model_dir(name_or_path, allow_patterns=[CONFIG_NAME], **options) / CONFIG_NAME
    if not config_file.is_file():
        return  # the loader reports the missing config.json with more context
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", MODEL_TYPE)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return  # likewise for a malformed file
    _check_model_type(model_type, config_file)


class AutoConfig:
    """`AutoConfig.from_pretrained(name)` -> `Qwen2Config`, refusing other model types."""

    def __init__(self) -> None:
        raise OSError("AutoConfig is not instantiable: use AutoConfig.from_pretrained(name) or "
                      "AutoConfig.for_model('qwen2')")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Qwen2Config:
        _peek_model_type(pretrained_model_name_or_path, kwargs)
        return Qwen2Config.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def for_model(cls, model_type: str, **kwargs: Any) -> Qwen2Config:
        _check_model_type(model_type, "for_model")
        return Qwen2Config(**kwargs)


class _AutoModel:
    """Dispatch to one Qwen2 class; subclasses name it in `_class_name` (imported lazily: model.py needs torch)."""

    _class_name = ""

    def __init__(self) -> None:
        raise OSError(f"{type(self).__name__} is not instantiable: use {type(self).__name__}.from_pretrained(name) "
                      f"or {type(self).__name__}.from_config(config)")

    @classmethod
    def _model_class(cls) -> type:
        import qwen2.model

        return getattr(qwen2.model, cls._class_name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        config = kwargs.get("config")
        if config is None or isinstance(config, (str, os.PathLike)):
            _peek_model_type(config if config is not None else pretrained_model_name_or_path, kwargs)
        else:
            _check_model_type(getattr(config, "model_type", None), "The given config")
        return cls._model_class().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_config(cls, config: Qwen2Config, **kwargs: Any):
        """A randomly initialised model for `config`; `dtype`/`torch_dtype` choose the parameter dtype."""
        _check_model_type(getattr(config, "model_type", None), "The given config")
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        return cls._model_class()._from_config(config, dtype=dtype if dtype is not None else torch_dtype, **kwargs)


class AutoModel(_AutoModel):
    _class_name = "Qwen2Model"


class AutoModelForCausalLM(_AutoModel):
    _class_name = "Qwen2ForCausalLM"


class AutoModelForSequenceClassification(_AutoModel):
    _class_name = "Qwen2ForSequenceClassification"


class AutoModelForTokenClassification(_AutoModel):
    _class_name = "Qwen2ForTokenClassification"


class AutoModelForQuestionAnswering(_AutoModel):
    _class_name = "Qwen2ForQuestionAnswering"


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(name)` -> `Qwen2TokenizerFast` (or the pure-Python `Qwen2Tokenizer`)."""

    def __init__(self) -> None:
        raise OSError("AutoTokenizer is not instantiable: use AutoTokenizer.from_pretrained(name)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *inputs: Any, use_fast: bool = True,
                        **kwargs: Any):
        from qwen2 import tokenizer

        tokenizer_class = tokenizer.Qwen2TokenizerFast if use_fast else tokenizer.Qwen2Tokenizer
        return tokenizer_class.from_pretrained(pretrained_model_name_or_path, *inputs, **kwargs)
