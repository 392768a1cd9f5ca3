"""How soon `qwen2 chat` is usable, cold (no compiled step saved: it is compiled in a background process
while the first answers are eager) and warm (the saved compiled step is loaded), beside `--no-compile`
(eager only, nothing in the background: the first answer's speed without any compile competing).

    python benchmarks/bench_chat_start.py [--model PATH] [--threads 2] [-q int8]

For each start: seconds to the prompt, the first answer's time to first token and decode rate (its
`--verbose` figures), seconds until the compiled step is in use, and the decode rate of an answer after that.
Drives the installed `qwen2` command through a pseudo-terminal (pexpect), as a user would. Deletes qwen2's
saved compiled steps and inductor cache (`~/.cache/qwen2/compile`) before the cold start. The default model
must already be joined (run `qwen2 info` once).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pexpect

QWEN2 = str(Path(sys.executable).parent / "qwen2")
QUESTION = "Write a Python function that reads a CSV file and returns the average of each numeric column."


def answer(child: pexpect.spawn) -> tuple[float, float]:
    """(time to first token s, decode tok/s) of one answer, from the `--verbose` figures."""
    child.sendline(QUESTION)
    child.expect(r"time to first token:\s+([\d.]+)(ms|s)")
    ttft = float(child.match.group(1)) / (1000 if child.match.group(2) == "ms" else 1)
    child.expect(r"eval rate:\s+([\d.]+) tokens/s")
    rate = float(child.match.group(1))
    child.expect(">>> ")
    return ttft, rate


def start(args: argparse.Namespace, *extra: str) -> dict[str, float | str]:
    env = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    command = ["chat", "--threads", str(args.threads), "--max-new-tokens", str(args.tokens), "--greedy",
               *extra] + (["--model", args.model] if args.model else []) + (["-q", args.q] if args.q else [])
    began = time.perf_counter()
    child = pexpect.spawn(QWEN2, command, env=env, encoding="utf-8", timeout=1200)
    try:
        child.expect(">>> ")
        figures: dict[str, float | str] = {"prompt s": time.perf_counter() - began}
        child.sendline("/set verbose")
        child.expect(">>> ")
        figures["1st ttft s"], figures["1st tok/s"] = answer(child)
        status = "eager (--no-compile)"
        while "--no-compile" not in extra:
            child.sendline("/show")
            child.expect(r"decode step: ([^\r\n]*)")
            status = child.match.group(1)
            child.expect(">>> ")
            if status.startswith(("compiled", "eager")):
                break
            time.sleep(0.5)
        figures["compiled in use s"] = time.perf_counter() - began
        figures["next tok/s"] = answer(child)[1]
        figures["status"] = status
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="passed to qwen2 chat --model (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-q", default=None, choices=("int8",), help="quantisation (default: bfloat16 weights)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per answer (greedy)")
    args = parser.parse_args()
    from qwen2.loading.default_model import cache_dir

    runs = [("eager only", start(args, "--no-compile"))]
    shutil.rmtree(cache_dir() / "compile", ignore_errors=True)
    runs.append(("cold", start(args)))
    runs.append(("warm", start(args)))
    print(f"qwen2 chat start, {args.q or 'bf16'}, {args.threads} threads, {args.tokens}-token greedy answers")
    for name, figures in runs:
        print(f"{name:>10}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k}: {v}"
                                          for k, v in figures.items()))


if __name__ == "__main__":
    main()
