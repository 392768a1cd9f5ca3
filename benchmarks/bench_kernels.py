"""Weight-only matmul kernels on the default model's shapes: bf16 F.linear vs PyTorch's packed int8/int4 CPU kernels;
for bf16 also oneDNN's inner product on the plain weight and on a packed copy (what generate() used to keep) and
our row kernel (`kernels.bf16_rows`), for int8 our `kernels.int8_rows`, up to 16 rows, and for int4 our
AVX512-VNNI kernel (`int4_kernel`, where it builds).

Decode is memory-bound, so the figure that matters is effective bandwidth: weight bytes read per call / time.
Each kernel cycles over enough copies of its weight to overflow the last-level cache, as a decode step over
24 layers does; timing one small matrix in a loop would measure cache bandwidth instead.
Usage: python benchmarks/bench_kernels.py [--threads 2] [--batch 1 8 16] [--group-size 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from qwen2.quantization import int4_kernel, kernels
from qwen2.quantization.int4 import pack_nibbles, to_vnni_layout

# (out_features, in_features) of Qwen2.5-0.5B: q/o, k/v, gate/up, down, lm_head.
SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)]


_CACHE_BUSTING_BYTES = 256 << 20


def _copies(nbytes: int) -> int:
    return max(1, -(-_CACHE_BUSTING_BYTES // nbytes))


def _time(fns: list, min_seconds: float = 0.5) -> float:
    """Fastest seconds per call, cycling through `fns` (one per weight copy) after a warm-up pass.

    The minimum, not the median: on a shared machine it is the figure least disturbed by other processes.
    """
    for fn in fns:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < min_seconds or len(times) < 2 * len(fns):
        fn = fns[i % len(fns)]
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        i += 1
    return min(times)


def bench_shape(n: int, k: int, batch: int, group_size: int) -> dict[str, tuple[float, float]]:
    """{kernel: (microseconds, GB/s)} for one (n, k) weight and a (batch, k) bf16 input."""
    x = torch.randn(batch, k, dtype=torch.bfloat16)
    results: dict[str, tuple[float, float]] = {}

    def record(name: str, make_fn, nbytes: int) -> None:
        seconds = _time([make_fn() for _ in range(_copies(nbytes))])
        results[name] = (seconds * 1e6, nbytes / seconds / 1e9)

    def bf16():
        w = torch.randn(n, k, dtype=torch.bfloat16)
        return lambda: F.linear(x, w)

    def int8():
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s8 = torch.rand(n, dtype=torch.bfloat16) * 1e-3
        return lambda: torch._weight_int8pack_mm(x, w8, s8)

    def int4():
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz = (torch.rand(k // group_size, n, 2) * 1e-3).to(torch.bfloat16)
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)

    def int4_vnni():
        codes = to_vnni_layout(pack_nibbles(torch.randint(0, 16, (n, k), dtype=torch.uint8)))
        sz = (torch.rand(k // group_size, n, 2) * 1e-3).to(torch.bfloat16)
        return lambda: int4_kernel.linear(x, codes, sz, group_size)

    def onednn(pack: bool):
        def make():
            w = torch.randn(n, k, dtype=torch.bfloat16)
            w = torch.ops.mkldnn._reorder_linear_weight(w, batch) if pack else w
            return lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return make

    def bf16_rows():
        w = torch.randn(n, k, dtype=torch.bfloat16)
        return lambda: kernels.bf16_rows(x, w, None)

    def int8_rows():
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s8 = torch.rand(n, dtype=torch.bfloat16) * 1e-3
        return lambda: kernels.int8_rows(x, w8, s8, None, 32767)

    record("bf16", bf16, n * k * 2)
    record("onednn", onednn(False), n * k * 2)
    record("onednn packed", onednn(True), n * k * 2)
    rows = kernels.bf16_rows_usable(x, torch.empty(n, k, dtype=torch.bfloat16))
    if rows:
        record("ours bf16_rows", bf16_rows, n * k * 2)
    record("int8", int8, n * k + n * 2)
    if rows:
        record("ours int8_rows", int8_rows, n * k + n * 2)
    record(f"int4/g{group_size}", int4, n * k // 2 + (k // group_size) * n * 4)
    if int4_kernel.load():
        record(f"ours int4/g{group_size}", int4_vnni, n * k // 2 + (k // group_size) * n * 4)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--group-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    for batch in args.batch:
        for i, (n, k) in enumerate(SHAPES):
            res = bench_shape(n, k, batch, args.group_size)
            if i == 0:
                print(f"{'shape (N x K)':>16} {'batch':>5}  " + "  ".join(f"{name:>22}" for name in res))
            cells = "  ".join(f"{us:9.1f} us {gbs:6.1f} GB/s" for us, gbs in res.values())
            print(f"{n:>7} x {k:<6} {batch:>5}  {cells}")


if __name__ == "__main__":
    main()
