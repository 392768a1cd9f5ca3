"""`qwen2 chat`: an interactive multi-turn chat, as `ollama run` offers one.

Line editing and a history kept across sessions (stdlib readline, in $XDG_STATE_HOME/qwen2/history),
multi-line messages between `\"\"\"` marks, and slash commands; a line starting with `/` is always a command,
never sent to the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qwen2.cli.answer import EchoStreamer, respond
from qwen2.cli.options import (
    MODEL_OPTIONS,
    SAMPLING_PARAMETERS,
    Sampling,
    add_model_options,
    add_sampling_options,
    load_model,
)
from qwen2.cli.warmup import BackgroundCompile, keep_inductor_cache

COMMANDS = (
    ("/help", "list these commands (also /?)"),
    ("/set NAME VALUE", f"set a sampling parameter: {', '.join(SAMPLING_PARAMETERS)} (temperature 0: greedy)"),
    ("/set verbose", "print timings after each answer (/set quiet stops)"),
    ("/show", "show the sampling settings, the system prompt and whether the decode step is compiled"),
    ("/system TEXT", "set the system prompt, keeping the conversation"),
    ("/save FILE", "write the conversation to FILE as JSON messages"),
    ("/load FILE", "replace the conversation with the JSON messages in FILE"),
    ("/reset", "clear the conversation (the system prompt stays)"),
    ("/exit", "leave the chat (also /bye, Ctrl-D)"),
)
MULTILINE = '"""'
_ROLES = ("system", "user", "assistant", "tool")


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("chat", parents=[common], help="interactive multi-turn chat (/help in it)",
                                 description="Chat with the model. Commands: " +
                                             "; ".join(f"{name}: {meaning}" for name, meaning in COMMANDS))
    parser.add_argument("--system", default=None,
                        help="system prompt (default: the chat template's own, if it has one)")
    add_model_options(parser)
    add_sampling_options(parser, compile_default="in the background, answering eagerly until it is ready; "
                                                  "--compile compiles before the first prompt")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sampling = Sampling.from_args(args)
    if args.compile is not False:
        keep_inductor_cache()
    model, tokenizer, load_seconds = load_model(args)
    if args.quantization in ("int8", "w8a8"):
        from qwen2.quantization import kernels

        kernels.load()  # built once per machine (it says so): here, not inside the first answer
    compiling = None
    if args.compile is not False:
        if not args.verbose:  # progress lines would land in the middle of the conversation
            logging.getLogger("qwen2.generation.fast").setLevel(logging.WARNING)
        compiling = BackgroundCompile(model, {name: getattr(args, name) for name in MODEL_OPTIONS}).start()
        if args.compile:
            compiling.wait()
            print(f"Decode step {compiling.status}.", file=sys.stderr, flush=True)
    chat = Chat(model, tokenizer, sampling, args.system, args.verbose, load_seconds, compiling)
    print("Chat with the model. /help lists the commands, /exit (or Ctrl-D) quits, "
          "Ctrl-C stops the current answer.", flush=True)
    try:
        with line_editing(history_path()):
            while (message := read_message(input)) is not None:
                if message.startswith("/"):
                    if not chat.command(message):
                        return 0
                elif message.strip():
                    chat.answer(message)
        print()
        return 0
    finally:
        if compiling is not None:
            compiling.close()


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "qwen2" / "history"


@contextlib.contextmanager
def line_editing(path: Path) -> Iterator[None]:
    """readline's editing for input(), with the history of earlier sessions loaded and saved back."""
    try:
        import readline
    except ImportError:  # not on every platform: input() still works, without editing
        yield
        return
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def read_message(read: Callable[[str], str]) -> str | None:
    """One message: a line, or the lines between an opening and a closing `\"\"\"`; None at end of input.
    Ctrl-C while typing drops what was typed."""
    while True:
        try:
            line = read(">>> ")
            if not line.lstrip().startswith(MULTILINE):
                return line.strip()
            text = line.lstrip()[len(MULTILINE):]
            lines = []
            while not text.rstrip().endswith(MULTILINE):
                lines.append(text)
                text = read("... ")
            lines.append(text.rstrip()[:-len(MULTILINE)])
            return "\n".join(lines).strip("\n")
        except EOFError:
            return None
        except KeyboardInterrupt:
            print()
        except UnicodeDecodeError as err:  # the terminal sent bytes that are not UTF-8: say so, keep chatting
            print(f"(that line is not UTF-8 text: {err.reason} at byte {err.start}; not sent)", flush=True)


class Chat:
    """The conversation and the settings a chat session changes as it goes."""

    def __init__(self, model: Any, tokenizer: Any, sampling: Sampling, system: str | None, verbose: bool,
                 load_seconds: float, compiled: BackgroundCompile | None) -> None:
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.verbose, self.load_seconds, self.compiled = verbose, load_seconds, compiled
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def answer(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        prompt = self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        echo = EchoStreamer(self.tokenizer)
        # With a background compile, generate() decodes eagerly until the compiled step is ready, then with it.
        gen_kwargs = {**self.sampling.generate_kwargs(), "disable_compile": self.compiled is None}
        try:
            with self.compiled.paused() if self.compiled is not None else contextlib.nullcontext():
                respond(self.model, self.tokenizer, prompt, gen_kwargs, echo)
        except KeyboardInterrupt:
            # The partial answer stays in the conversation: the user saw it and may refer to it.
            print("\n(stopped)", flush=True)
        self.messages.append({"role": "assistant", "content": echo.text})
        if self.verbose and echo.stats.new_tokens:
            print(echo.stats.summary(self.load_seconds), file=sys.stderr, flush=True)

    def command(self, text: str) -> bool:
        """Run one slash command; False when it ends the session."""
        name, _, rest = text.strip().partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/bye", "/quit"):
            return False
        handler = {"/help": self._help, "/?": self._help, "/set": self._set, "/show": self._show,
                   "/system": self._system, "/save": self._save, "/load": self._load,
                   "/reset": self._reset, "/clear": self._reset}.get(name)
        if handler is None:
            print(f"Unknown command {name!r}. The commands are:")
            self._help("")
            return True
        try:
            handler(rest)
        except (ValueError, OSError) as error:
            print(f"error: {error}", flush=True)
        return True

    def _help(self, rest: str) -> None:
        width = max(len(name) for name, _ in COMMANDS)
        print("\n".join(f"  {name:<{width}}  {meaning}" for name, meaning in COMMANDS))
        print(f'  {MULTILINE} ... {MULTILINE:<{width - 8}}  a message of several lines')

    def _set(self, rest: str) -> None:
        name, _, value = rest.partition(" ")
        name = name.replace("-", "_")
        if name in ("verbose", "quiet") and not value:
            self.verbose = name == "verbose"
            print(f"Set {name} mode.")
        elif name in SAMPLING_PARAMETERS and value.strip():
            self.sampling.set(name, value.strip())
            print(f"Set {name} to {value.strip()}.")
        else:
            raise ValueError(f"usage: /set NAME VALUE with NAME one of {', '.join(SAMPLING_PARAMETERS)}; "
                             f"or /set verbose, /set quiet")

    def _show(self, rest: str) -> None:
        system = next((m["content"] for m in self.messages if m["role"] == "system"), None)
        print(f"sampling: {self.sampling.describe()}")
        print(f"system prompt: {system!r}" if system else "system prompt: the chat template's default")
        print(f"messages: {len(self.messages)}")
        if self.compiled is None:
            print("decode step: eager (--no-compile)")
        else:
            print(f"decode step: {self.compiled.status}; {self.compiled.step.compiled_calls} token(s) decoded with it")

    def _system(self, rest: str) -> None:
        if not rest:
            raise ValueError("usage: /system TEXT")
        self.messages = [{"role": "system", "content": rest}] + [m for m in self.messages if m["role"] != "system"]
        print("Set the system prompt.")

    def _save(self, rest: str) -> None:
        if not rest:
            raise ValueError("usage: /save FILE")
        path = Path(rest).expanduser()
        path.write_text(json.dumps(self.messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"Saved {len(self.messages)} messages to {path}.")

    def _load(self, rest: str) -> None:
        if not rest:
            raise ValueError("usage: /load FILE")
        path = Path(rest).expanduser()
        try:
            messages = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON: {err}") from None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"{path} must hold a JSON list of messages like "
                             f'{{"role": "user", "content": "..."}} (roles: {", ".join(_ROLES)})')
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        print(f"Loaded {len(self.messages)} messages from {path}.")

    def _reset(self, rest: str) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        print("(history cleared)", flush=True)
