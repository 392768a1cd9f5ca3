"""The lazily imported `llguidance` and the token table it needs, built from our tokenizers' vocabulary.

`llguidance.hf.from_tokenizer` wants a transformers tokenizer; the package never imports transformers, so the
table is built here from the vocabulary itself (the byte-level symbols decoded back to bytes), which works for
the pure-Python tokenizer, the `tokenizers`-backed one and transformers' alike.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

from qwen2.tokenizer.byte_level import UNICODE_TO_BYTE

_INSTALL_HINT = 'Structured output needs the `llguidance` package: pip install "qwen2[structured]"'
_cache: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_executor: Any = None


def llguidance() -> Any:
    try:
        import llguidance as llg
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return llg


def executor() -> Any:
    """One shared LLExecutor: it computes the masks of many sequences in parallel threads (GIL released)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = llguidance().LLExecutor()
        return _executor


class _TokenTable:
    """What `llguidance.LLTokenizer` reads from a tokenizer: each id's bytes, the special ids, and encoding."""

    is_tokenizer_wrapper = True

    def __init__(self, tokenizer: Any, eos_token_id: int) -> None:
        added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
        self.tokens: list[bytes] = [b""] * len(tokenizer)
        for symbol, index in tokenizer.get_vocab().items():
            if index in added or any(ch not in UNICODE_TO_BYTE for ch in symbol):
                self.tokens[index] = symbol.encode("utf-8")  # added tokens are stored as plain text
            else:
                self.tokens[index] = bytes(UNICODE_TO_BYTE[ch] for ch in symbol)
        self.special_token_ids = [index for index, token in added.items() if getattr(token, "special", False)]
        self.eos_token_id = eos_token_id
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))


def ll_tokenizer(tokenizer: Any, eos_token_ids: Sequence[int]) -> Any:
    """The `LLTokenizer` of `tokenizer` whose end tokens are `eos_token_ids`; built once (~1 s) and cached while
    the tokenizer lives and its vocabulary keeps its size."""
    if not eos_token_ids:
        raise ValueError("Constrained decoding needs an end-of-sequence token id (the tokenizer has none; pass "
                         "`eos_token_id=`).")
    key = (len(tokenizer), tuple(eos_token_ids))
    try:
        per_tokenizer = _cache.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build every time
        per_tokenizer = {}
    if key not in per_tokenizer:
        table = _TokenTable(tokenizer, eos_token_ids[0])
        per_tokenizer.clear()
        per_tokenizer[key] = llguidance().LLTokenizer(table, eos_token=list(eos_token_ids))
    return per_tokenizer[key]
