"""The `qwen2` command line (`qwen2.cli.main`)."""

from qwen2.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
