"""Qwen2 tokenizers (pure-Python and `tokenizers`-backed) and chat templates.

`Qwen2Tokenizer` is the pure-Python one (never imports `tokenizers`); `Qwen2TokenizerFast` runs on
`tokenizers`. Both load a transformers-layout directory, a .gguf file or a hub id with
`from_pretrained`, and give the same ids as transformers' Qwen2 tokenizers.
"""

from __future__ import annotations

import os
from typing import Any

from qwen2.tokenizer.added import AddedToken
from qwen2.tokenizer.encoding import BatchEncoding
from qwen2.tokenizer.files import TokenizerFileError
from qwen2.tokenizer.slow import Qwen2Tokenizer
from qwen2.tokenizer.tool_schema import get_json_schema


def __getattr__(name: str) -> Any:
    # The fast class is imported on first use, so the pure-Python path never loads `tokenizers`.
    if name == "Qwen2TokenizerFast":
        from qwen2.tokenizer.fast import Qwen2TokenizerFast

        return Qwen2TokenizerFast
    raise AttributeError(f"module 'qwen2.tokenizer' has no attribute {name!r}")


def load_tokenizer(name_or_path: str | os.PathLike, use_fast: bool = True, **kwargs: Any) -> Any:
    """`Qwen2TokenizerFast.from_pretrained` (or the pure-Python class with `use_fast=False`)."""
    if use_fast:
        from qwen2.tokenizer.fast import Qwen2TokenizerFast

        return Qwen2TokenizerFast.from_pretrained(name_or_path, **kwargs)
    return Qwen2Tokenizer.from_pretrained(name_or_path, **kwargs)


__all__ = [
    "AddedToken", "BatchEncoding", "Qwen2Tokenizer", "Qwen2TokenizerFast", "TokenizerFileError", "get_json_schema",
    "load_tokenizer",
]
