"""Our fast decode path alone, in one process: eager vs compiled decode step, bf16 or fp32, batch 1 and 8.

Covers what bench_generate.py does not (ours in float32, the compiled step and its compile time); compare
with transformers through bench_generate.py. Check `uptime` first: with 2 threads on 2 busy cores every
parallel region can wait a scheduler tick, and decode drops 10-20x.

    python benchmarks/bench_decode.py --dtype bf16 --compile --prefill 128 512 2048
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import qwen2
from qwen2.loading.default_model import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="decode with the torch.compile'd step")
    parser.add_argument("--prefill", type=int, nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = qwen2.Qwen2ForCausalLM.from_pretrained(str(default_model_path()), dtype=dtype).eval()
    prompt = torch.arange(1000, 1032)[None]

    def run(ids: torch.Tensor, n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, disable_compile=not args.compile)
        return time.perf_counter() - start

    print(f"torch {torch.__version__}, {args.dtype}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    for batch in args.batch:
        ids = prompt.repeat(batch, 1)
        print(f"batch {batch}: first call (compiles if --compile) {run(ids, 3):.1f} s")
        prefill = min(run(ids, 1) for _ in range(2))
        total = run(ids, args.new_tokens)
        rate = batch * (args.new_tokens - 1) / (total - prefill)
        print(f"batch {batch}: decode {rate:.1f} tok/s ({'compiled' if args.compile else 'eager'}), "
              f"load average {os.getloadavg()[0]:.1f}")
    for length in args.prefill:
        ids = torch.randint(100, 10000, (1, length))
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            start = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        print(f"prefill {length}: {length / (time.perf_counter() - start):.0f} tok/s")


if __name__ == "__main__":
    main()
