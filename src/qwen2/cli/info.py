"""`qwen2 info`: describe a model from its headers (no weights are loaded)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("info", parents=[common],
                                 help="describe a model: config, size, parameters, dtypes, quantisation types")
    parser.add_argument("model", nargs="?", default=None,
                        help="directory, .gguf file or hub id (default: the embedded model's GGUF)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside the model directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qwen2.loading.info import describe_model

    source = args.model
    if source is None:
        from qwen2.loading.default_model import default_model_path

        source = str(default_model_path())
    for key, value in describe_model(source, gguf_file=args.gguf_file).items():
        print(f"{key:>24}: {value}")
    return 0
