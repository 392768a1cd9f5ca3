"""`qwen2 generate`: complete one prompt, streaming the answer to stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qwen2.cli.answer import EchoStreamer, compile_up_front, respond
from qwen2.cli.options import Sampling, add_model_options, add_sampling_options, load_model


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("generate", parents=[common], help="complete one prompt, streaming the answer",
                                 description="Complete one prompt (through the chat template unless --raw), "
                                             "streaming the answer to stdout.")
    parser.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    parser.add_argument("--system", default=None,
                        help="system prompt (default: the chat template's own, if it has one)")
    add_model_options(parser)
    add_sampling_options(parser, compile_default="off: one answer rarely repays the compile time")
    parser.set_defaults(run=run)


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"standard input is not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})") \
            from None


def run(args: argparse.Namespace) -> int:
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    sampling = Sampling.from_args(args)
    model, tokenizer, load_seconds = load_model(args)
    if args.compile:
        compile_up_front(model)
    if not args.raw:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    echo = EchoStreamer(tokenizer)
    respond(model, tokenizer, prompt, {**sampling.generate_kwargs(), "disable_compile": not args.compile}, echo)
    if args.verbose:
        print(echo.stats.summary(load_seconds), file=sys.stderr)
    return 0
