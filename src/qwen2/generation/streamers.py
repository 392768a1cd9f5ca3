"""Streamers: turn the token ids `generate()` pushes into text as soon as that text is final.

Same protocol and chunking rules as transformers' `generation/streamers.py`: `put(ids)` is called once
with the prompt and then with each new token, `end()` once at the end. Text is re-decoded from the
start of the current line, and only released when it can no longer change: a completed line, a CJK
character, or (otherwise) up to the last space. A token that ends inside a multi-byte UTF-8 character
decodes to U+FFFD, which is never released mid-word, so partial characters never reach the user.
"""

from __future__ import annotations

import sys
import unicodedata
from queue import Queue
from typing import Any

import torch


class BaseStreamer:
    """What `generate()` talks to: `put` new token ids, then `end`."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


def _is_cjk(codepoint: int) -> bool:
    """CJK ideographs are words on their own, so they can be released without waiting for a space."""
    return (
        0x4E00 <= codepoint <= 0x9FFF
        or 0x3400 <= codepoint <= 0x4DBF
        or 0x20000 <= codepoint <= 0x2A6DF
        or 0x2A700 <= codepoint <= 0x2B73F
        or 0x2B740 <= codepoint <= 0x2B81F
        or 0x2B820 <= codepoint <= 0x2CEAF
        or 0xF900 <= codepoint <= 0xFAFF
        or 0x2F800 <= codepoint <= 0x2FA1F
    )


class TextStreamer(BaseStreamer):
    """Writes generated text to stdout as it becomes final (batch size 1 only)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0  # characters of decode(token_cache) already released
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError(f"{type(self).__name__} only supports batch size 1, got a batch of {value.shape[0]}.")
        if value.dim() > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        pending = text[self.print_len :]
        if text.endswith("\n"):
            # The line is complete: restart the cache from its last token to bound re-decoding cost.
            self.token_cache = self.token_cache[-1:]
            self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        elif text and _is_cjk(ord(text[-1])):
            self.print_len += len(pending)
        elif all(char.isspace() or unicodedata.category(char)[0] in "LMN" for char in pending):
            self.print_len += len(pending)
        else:
            pending = text[self.print_len : text.rfind(" ") + 1]
            self.print_len += len(pending)
        self.on_finalized_text(pending)

    def end(self) -> None:
        """Release whatever is left and mark the end of the stream."""
        text = ""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len :]
        self.token_cache = []
        self.print_len = 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        sys.stdout.write(text + ("\n" if stream_end else ""))
        sys.stdout.flush()


class TextIteratorStreamer(TextStreamer):
    """Queues final text for another thread: `for chunk in streamer` while `generate()` runs in a thread."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue[str | None] = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value
