"""The `qwen2` command: a thin argparse layer over the library (generate, chat, info, convert).

Every subcommand turns a user mistake (missing model, bad file, bad option) into one line on stderr and
exit status 1 (argparse's own usage errors exit 2); tracebacks are kept for `--verbose`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("qwen2.cli")

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_SYSTEM_PROMPT = None  # None lets the model's chat template choose its own default system prompt


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=None,
                       help="local directory, .gguf file or hub id (default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    group.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory")
    group.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weight dtype (default: bfloat16)")
    group.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    group.add_argument("--quantization", "-q", default=None, choices=("int8", "int4", "w8a8"),
                       help="quantisation applied at load: int8/int4 weight-only, or w8a8 (int8 weights and "
                            "activations: faster long prompts) (default: none)")
    group.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default 32)")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=512)
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the decode step before the first answer: ~1.5x faster decoding for "
                            "~40 s once per machine (2 cores), ~10 s per start afterwards (default: on for chat, "
                            "off for generate)")
    group.add_argument("--greedy", action="store_true", help="greedy decoding (ignores the sampling options)")
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--min-p", type=float, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2", description="Run Qwen2 / Qwen2.5 language models.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress and show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="complete one prompt, streaming the answer")
    generate.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    generate.add_argument("--raw", action="store_true", help="do not apply the chat template")
    generate.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt (chat template only)")
    _add_model_options(generate)
    _add_sampling_options(generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    chat.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt")
    _add_model_options(chat)
    _add_sampling_options(chat)

    info = commands.add_parser("info", help="describe a model: config, size, dtypes, quantisation types")
    info.add_argument("model", nargs="?", default=None, help="directory, .gguf file or hub id (default: embedded)")
    info.add_argument("--gguf-file", default=None)

    convert = commands.add_parser("convert", help="convert a GGUF into a transformers-loadable safetensors directory")
    convert.add_argument("gguf", help="path of the .gguf file")
    convert.add_argument("out_dir", help="output directory (must not exist or be empty, unless --overwrite)")
    convert.add_argument("--dtype", default="float32", choices=DTYPES[1:])
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    from qwen2.serving.cli import add_serve_command

    add_serve_command(commands)
    return parser


def _model_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """The (path or id, gguf_file) to load: the embedded default model when none is given."""
    if args.model is None:
        from qwen2.loading.default_model import default_model_path

        return str(default_model_path()), None
    return args.model, args.gguf_file


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from qwen2 import AutoModelForCausalLM, AutoTokenizer

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    source, gguf_file = _model_source(args)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=args.dtype,
                                                 quantization=args.quantization, group_size=args.group_size)
    return model, tokenizer


def _generation_kwargs(args: argparse.Namespace, compile_by_default: bool) -> dict[str, Any]:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    compile_step = compile_by_default if args.compile is None else args.compile
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "disable_compile": not compile_step}
    if args.greedy:
        kwargs["do_sample"] = False
        return kwargs
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if args.seed is not None:
        import torch

        kwargs["generator"] = torch.Generator().manual_seed(args.seed)
    return kwargs


class _EchoStreamer:
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
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                outer.text += text
                sys.stdout.write(text + ("\n" if stream_end else ""))
                sys.stdout.flush()

        self.text = ""
        self.interrupted = False
        self.streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    @contextlib.contextmanager
    def interruptible(self) -> Any:
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


def _compile_up_front(model: Any, gen_kwargs: dict[str, Any]) -> None:
    """Compile the decode step with a two-token warm-up, so the one-time cost is a start-up step and not a
    pause inside the first answer."""
    if not gen_kwargs["disable_compile"]:
        import torch

        model.generate(torch.zeros(1, 1, dtype=torch.long, device=model.device), max_new_tokens=2, min_new_tokens=2,
                       do_sample=False, disable_compile=False)


def _respond(model: Any, tokenizer: Any, prompt: str, gen_kwargs: dict[str, Any], echo: _EchoStreamer) -> None:
    inputs = tokenizer([prompt], return_tensors="pt").to(model.device)
    with echo.interruptible():
        model.generate(**inputs, streamer=echo.streamer, **gen_kwargs)


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    gen_kwargs = _generation_kwargs(args, compile_by_default=False)  # one answer: rarely repays the compile
    model, tokenizer = _load(args)
    _compile_up_front(model, gen_kwargs)
    if not args.raw:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = _chat_prompt(tokenizer, messages + [{"role": "user", "content": prompt}])
    _respond(model, tokenizer, prompt, gen_kwargs, _EchoStreamer(tokenizer))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    gen_kwargs = _generation_kwargs(args, compile_by_default=True)
    model, tokenizer = _load(args)
    _compile_up_front(model, gen_kwargs)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    print("Chat with the model. /reset clears the history, /exit (or Ctrl-D) quits, "
          "Ctrl-C stops the current answer.", flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(system)
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": line})
        echo = _EchoStreamer(tokenizer)
        try:
            _respond(model, tokenizer, _chat_prompt(tokenizer, history), gen_kwargs, echo)
        except KeyboardInterrupt:
            # The partial answer stays in the history: the user saw it and may refer to it.
            print("\n(stopped)", flush=True)
        history.append({"role": "assistant", "content": echo.text})


def cmd_info(args: argparse.Namespace) -> int:
    from qwen2.loading.info import describe_model

    source = args.model
    if source is None:
        from qwen2.loading.default_model import default_model_path

        source = str(default_model_path())
    for key, value in describe_model(source, gguf_file=args.gguf_file).items():
        print(f"{key:>24}: {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from qwen2.loading.gguf import convert_gguf

    out = convert_gguf(Path(args.gguf), Path(args.out_dir), dtype=getattr(torch, args.dtype), progress=True,
                       overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from qwen2.serving.cli import cmd_serve as serve

    return serve(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "convert": cmd_convert, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qwen2.generation.fast").setLevel(logging.INFO)  # say so before a long first compile
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        if args.verbose:
            raise
        print(f"qwen2 {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
