"""`qwen2 convert`: a GGUF to a safetensors directory transformers loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qwen2.cli.options import DTYPES


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("convert", parents=[common],
                                 help="convert a GGUF into a transformers-loadable safetensors directory")
    parser.add_argument("gguf", help="path of the .gguf file")
    parser.add_argument("out_dir", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES[1:],
                        help="dtype of the dequantised weights (default: bfloat16, half the size of float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier conversion in out_dir")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from qwen2.loading.gguf import convert_gguf

    print(f"Converting to {args.dtype} (--dtype float32 for full precision, twice the size)", flush=True)
    out = convert_gguf(Path(args.gguf), Path(args.out_dir), dtype=getattr(torch, args.dtype), progress=True,
                       overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
