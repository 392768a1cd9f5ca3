"""One streamed answer: the text as it is decoded, Ctrl-C between tokens, and the figures `--verbose` prints."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class AnswerStats:
    """Timings of one answer, measured at the streamer (ollama's `--verbose` figures)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    started: float = 0.0  # generate() called
    first_token: float = 0.0  # the first new token reached the streamer: the prompt is processed
    last_token: float = 0.0

    def summary(self, load_seconds: float) -> str:
        prompt_seconds = self.first_token - self.started
        eval_seconds = self.last_token - self.first_token
        lines = [
            ("total duration", _seconds(self.last_token - self.started)),
            ("load duration", _seconds(load_seconds)),
            ("prompt eval count", f"{self.prompt_tokens} token(s)"),
            ("prompt eval duration", _seconds(prompt_seconds)),
            ("prompt eval rate", _rate(self.prompt_tokens, prompt_seconds)),
            ("time to first token", _seconds(prompt_seconds)),
            ("eval count", f"{self.new_tokens} token(s)"),
            ("eval duration", _seconds(eval_seconds)),
            # The first new token came out of the prompt's pass: the rate is over the ones after it.
            ("eval rate", _rate(self.new_tokens - 1, eval_seconds)),
        ]
        return "\n".join(f"{name + ':':<22}{value}" for name, value in lines)


def _seconds(seconds: float) -> str:
    return f"{seconds * 1000:.2f}ms" if seconds < 1 else f"{seconds:.3f}s"


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.2f} tokens/s" if tokens > 0 and seconds > 0 else "n/a"


class EchoStreamer:
    """Writes decoded text to stdout as it is finalised and keeps it, so an interrupted answer is not lost.

    Ctrl-C during an answer only sets a flag, which the streamer turns into KeyboardInterrupt between tokens
    (`interruptible`): raised wherever the signal lands, the exception can hit the guard code of the compiled
    decode step, which swallows it, and the answer ran on to its end (torch 2.13, measured)."""

    def __init__(self, tokenizer: Any) -> None:
        from qwen2 import TextStreamer

        outer = self

        class _Streamer(TextStreamer):
            def put(self, value: Any) -> None:
                if outer.interrupted:
                    raise KeyboardInterrupt
                outer._count(value)
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                outer.text += text
                sys.stdout.write(text + ("\n" if stream_end else ""))
                sys.stdout.flush()

        self.text = ""
        self.interrupted = False
        self.stats = AnswerStats()
        self._prompt_seen = False
        self.streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def _count(self, value: Any) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            self.stats.prompt_tokens = value.shape[-1]  # generate() hands the prompt over first
            return
        if not self.stats.new_tokens:
            self.stats.first_token = now
        self.stats.new_tokens += value.numel()
        self.stats.last_token = now

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within: SIGINT sets `interrupted` (acted on at the next token, or on leaving)."""
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or previous is not signal.default_int_handler:
            yield  # signals go to the main thread only; an ignored or custom SIGINT stays as it is
            return

        def note(signum: int, frame: Any) -> None:
            self.interrupted = True

        signal.signal(signal.SIGINT, note)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.interrupted:
            raise KeyboardInterrupt


def respond(model: Any, tokenizer: Any, prompt: str, gen_kwargs: dict[str, Any], echo: EchoStreamer) -> None:
    """Stream the model's answer to `prompt` (already templated) through `echo`."""
    inputs = tokenizer([prompt], return_tensors="pt").to(model.device)
    with echo.interruptible():
        echo.stats.started = time.perf_counter()
        model.generate(**inputs, streamer=echo.streamer, **gen_kwargs)


def compile_up_front(model: Any) -> None:
    """Compile the decode step with a two-token warm-up, so the one-time cost is a start-up step and not a
    pause inside the first answer."""
    import torch

    model.generate(torch.zeros(1, 1, dtype=torch.long, device=model.device), max_new_tokens=2, min_new_tokens=2,
                   do_sample=False, disable_compile=False)
