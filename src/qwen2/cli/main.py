"""The `qwen2` command: a thin argparse layer over the library.

Every subcommand turns a user mistake (missing model, bad file, bad option) into one line on stderr and
exit status 1 (argparse's own usage errors exit 2, after the subcommand's usage); tracebacks are kept for
`--verbose`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Sequence

# The subcommands, in the order `qwen2 --help` lists them: each module's `register(subcommands, common)` adds
# its parser (with `common` as a parent) and sets `run`, the function called with the parsed arguments.
SUBCOMMANDS = (
    "qwen2.cli.generate",
    "qwen2.cli.repl",  # chat
    "qwen2.cli.info",
    "qwen2.cli.convert",
    "qwen2.serving.cli",  # serve
    "qwen2.training.cli",  # finetune
)


def _version() -> str:
    try:
        version = importlib.metadata.version("qwen2")
    except importlib.metadata.PackageNotFoundError:
        from qwen2 import __version__ as version
    try:
        torch = f"torch {importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:
        torch = "torch not installed"
    return f"qwen2 {version} ({torch}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2", description="Run Qwen2 / Qwen2.5 language models.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="print timings after each answer, log progress, show tracebacks")
    # -v after the subcommand too; SUPPRESS keeps a -v given before it from being reset to False.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="print timings after each answer, log progress, show tracebacks")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(subcommands, common)
    for name, subparser in subcommands.choices.items():
        subparser.set_defaults(parser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported with the subcommand's usage, not the top-level one
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Say so before a long first compile or build.
    for name in ("qwen2.generation.fast", "qwen2.quantization.kernels"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user, whatever it was; --verbose keeps the traceback
        if args.verbose:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, (OSError, ValueError, RuntimeError, KeyError)):
            message = f"{type(error).__name__}: {message} (run with --verbose for the traceback)"
        print(f"qwen2 {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
