"""How soon `qwen2 chat` is usable: seconds to the prompt, to the first answer's end, and until the compiled
decode step takes over, for a cold start (no inductor cache, no saved compile caches), a start with only
qwen2's saved compile caches (a fresh inductor cache directory: what a new machine or a cleaned /tmp sees),
and a warm start (both).

    python benchmarks/bench_chat_start.py [--model PATH] [--threads 2]

Drives the installed `qwen2` command through a pseudo-terminal (pexpect), as a user would. The default model
must already be joined (run `qwen2 info` once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pexpect

QWEN2 = str(Path(sys.executable).parent / "qwen2")


def start(args: argparse.Namespace, inductor_dir: str) -> dict[str, float]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir, "TERM": "dumb", "HF_HUB_OFFLINE": "1"}
    command = ["chat", "--threads", str(args.threads), "--max-new-tokens", "32"] + (
        ["--model", args.model] if args.model else [])
    began = time.perf_counter()
    child = pexpect.spawn(QWEN2, command, env=env, encoding="utf-8", timeout=900)
    try:
        child.expect(">>> ")
        prompt = time.perf_counter() - began
        child.sendline("Write a haiku about the sea")
        child.expect(">>> ")
        answered = time.perf_counter() - began
        status = ""
        while not status.startswith(("compiled", "eager")):
            time.sleep(0.5)
            child.sendline("/show")
            child.expect(r"decode step: ([^\r\n]*)")
            status = child.match.group(1)
            child.expect(">>> ")
        compiled = time.perf_counter() - began
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return {"prompt s": prompt, "first answer done s": answered, "compiled step ready s": compiled,
            "status": status}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="passed to qwen2 chat --model (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from qwen2.loading.default_model import cache_dir

    saved = cache_dir() / "compile"
    runs = []
    with tempfile.TemporaryDirectory() as cold, tempfile.TemporaryDirectory() as fresh:
        shutil.rmtree(saved, ignore_errors=True)  # qwen2's saved compile caches: rebuilt by the cold start
        runs.append(("cold", start(args, cold)))
        runs.append(("saved caches only", start(args, fresh)))
        runs.append(("warm", start(args, cold)))
    for name, figures in runs:
        print(f"{name:>18}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
                                          for k, v in figures.items()))


if __name__ == "__main__":
    main()
