"""Offline serving throughput: our engine (continuous batching, paged + prefix-cached KV) against our generate()
one request at a time, generate() on padded static batches of 8, and transformers' continuous batching
(`generate_batch`), on one seeded synthetic workload; plus the prefix cache's effect on time to first token.

    python benchmarks/bench_engine.py                 # ~10-15 min on 2 cores
    python benchmarks/bench_engine.py --modes engine-int8,generate-int8 --requests 16

Every mode runs in its own subprocess (so peak RSS is its own) on the embedded default GGUF. All requests
arrive at t=0 with EOS ignored; TTFT is measured from t=0 (queueing included, as an offline batch sees it),
TPOT per request is (finish - first token) / (tokens - 1). See benchmarks/README.md for figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = ("engine-int8", "engine-bf16", "generate-int8", "static8-int8", "hf-cb-bf16", "prefix-int8")


def _workload(args: argparse.Namespace) -> dict:
    import random

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1000, 100_000) for _ in range(rng.randint(*args.prompt))]
               for _ in range(args.requests)]
    outputs = [rng.randint(*args.output) for _ in range(args.requests)]
    system = [rng.randrange(1000, 100_000) for _ in range(args.prefix_tokens)]
    shared = [system + [rng.randrange(1000, 100_000) for _ in range(50)] for _ in range(args.prefix_requests)]
    return {"prompts": prompts, "outputs": outputs, "shared": shared, "threads": args.threads,
            "timeout": args.timeout, "proxy_layers": args.proxy_layers}


def _percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)} if values else {}


def _summary(start: float, first: list[float], done: list[float], tokens: list[int]) -> dict:
    wall = max(done) - start
    tpot = [(d - f) / (n - 1) for f, d, n in zip(first, done, tokens) if n > 1]
    return {"wall_s": wall, "output_tok_s": sum(tokens) / wall, "ttft_s": _percentiles([f - start for f in first]),
            "tpot_ms": {k: v * 1000 for k, v in _percentiles(tpot).items()}}


def _load_ours(quantization: str | None, proxy_layers: int | None):
    """The default model, or (`--proxy-layers N`) a random-weight model of its widths with N layers: a quick
    stand-in that keeps every per-step cost but the layer count."""
    import torch

    from qwen2 import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from qwen2.loading.default_model import default_model_path
    from qwen2.quantization import quantize_model

    if proxy_layers is None:
        return AutoModelForCausalLM.from_pretrained(str(default_model_path(progress=False)), dtype=torch.bfloat16,
                                                    quantization=quantization).eval()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=proxy_layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval().to(torch.bfloat16)
    return quantize_model(model, quantization) if quantization else model


def _run_engine(model, prompts, outputs, **config) -> tuple[dict, object]:
    from qwen2 import SamplingParams
    from qwen2.serving.engine import EngineConfig, LLMEngine

    engine = LLMEngine(model, None, EngineConfig(**config))
    warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("warm", prompts[0][:64], warm)
    while engine.has_unfinished_requests():
        engine.step()
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, outputs)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    first, done = [0.0] * len(prompts), [0.0] * len(prompts)
    while engine.has_unfinished_requests():
        for out in engine.step():
            i = int(out.request_id)
            if not first[i] and out.outputs[0].token_ids:
                first[i] = time.perf_counter()
            if out.finished:
                done[i] = time.perf_counter()
    return _summary(start, first, done, outputs), engine


class _Timer:
    def __init__(self, rows: int) -> None:
        self.first: float | None = None
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _run_generate(model, prompts, outputs, batch: int) -> dict:
    import torch

    model.generate(torch.tensor([prompts[0][:64]]), max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    first, done = [], []
    for lo in range(0, len(prompts), batch):
        group, counts = prompts[lo:lo + batch], outputs[lo:lo + batch]
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        timer = _Timer(len(group))
        # A static batch runs until its longest answer; each request's own tokens are all it delivers.
        model.generate(ids, attention_mask=mask, max_new_tokens=max(counts), do_sample=False, eos_token_id=None,
                       pad_token_id=0, streamer=timer)
        end = time.perf_counter()
        first += [timer.first] * len(group)
        # Request i's last token came at step counts[i] of the batch's steps (steps are about equally long).
        done += [timer.first + (end - timer.first) * (n - 1) / max(1, max(counts) - 1) for n in counts]
    return _summary(start, first, done, outputs)


def _run_hf(prompts, outputs) -> dict:
    import torch
    import transformers

    from qwen2.loading.default_model import default_model_path

    gguf = default_model_path(progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.bfloat16).eval()
    config = transformers.GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    start = time.perf_counter()
    # generate_batch takes one max_new_tokens; every request runs to the longest, only its own count is useful.
    results = model.generate_batch(inputs=prompts, generation_config=config, record_timestamps=True)
    end = time.perf_counter()
    ordered = [results[k] for k in sorted(results, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    first, done = [], []
    for out, n in zip(ordered, outputs):
        stamps = getattr(out, "timestamps", None)  # time.perf_counter() of each generated token
        if stamps:
            first.append(stamps[0])
            done.append(stamps[min(n, len(stamps)) - 1])
        else:
            first.append(end)
            done.append(end)
    return _summary(start, first, done, outputs)


def _run_prefix(model, shared) -> dict:
    result = {}
    for caching in (False, True):
        # One request at a time: the first computes the system prompt, the later ones may reuse it.
        ttfts = []
        from qwen2 import SamplingParams
        from qwen2.serving.engine import EngineConfig, LLMEngine

        engine = LLMEngine(model, None, EngineConfig(enable_prefix_caching=caching))
        for i, prompt in enumerate(shared):
            start = time.perf_counter()
            engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
            ttfts.append(time.perf_counter() - start)
        result["cached" if caching else "cold"] = {"first_s": ttfts[0], "rest_mean_s": sum(ttfts[1:]) / len(ttfts[1:]),
                                                   "hits": engine.stats().prefix_cache_hits}
    return result


def run_worker(mode: str, spec: dict) -> dict:
    import torch

    from engines import memory_mb

    torch.set_num_threads(spec["threads"])
    prompts, outputs = spec["prompts"], spec["outputs"]
    kind, variant = mode.split("-")
    start = time.perf_counter()
    if kind == "hf":
        result = _run_hf(prompts, outputs)
    else:
        model = _load_ours("int8" if variant == "int8" else None, spec["proxy_layers"])
        load = time.perf_counter() - start
        if kind == "engine":
            result, _ = _run_engine(model, prompts, outputs, max_num_seqs=16, max_num_batched_tokens=512)
        elif kind == "generate":
            result = _run_generate(model, prompts, outputs, batch=1)
        elif kind == "static8":
            result = _run_generate(model, prompts, outputs, batch=8)
        else:
            result = _run_prefix(model, spec["shared"])
        result["load_s"] = load
    result["mode"] = mode
    result["peak_rss_mb"] = memory_mb()["peak_rss_mb"]
    return result


def run_mode(mode: str, spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--spec", str(spec_path),
                                   "--out", str(out_path)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=spec["timeout"])
        except subprocess.TimeoutExpired:
            return {"mode": mode, "error": f"timed out after {spec['timeout']} s"}
        if proc.returncode != 0 or not out_path.exists():
            return {"mode": mode, "error": "\n".join(proc.stdout.strip().splitlines()[-8:])}
        return json.loads(out_path.read_text())


def report(results: list[dict], spec: dict) -> str:
    lines = [f"{len(spec['prompts'])} requests, prompts {min(map(len, spec['prompts']))}-"
             f"{max(map(len, spec['prompts']))} tokens, outputs {min(spec['outputs'])}-{max(spec['outputs'])} "
             f"tokens (EOS ignored), {spec['threads']} threads", "",
             "| mode | output tok/s | TTFT p50 / p90 / p99 s | TPOT p50 / p90 / p99 ms | wall s | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    base = next((r["output_tok_s"] for r in results if r["mode"] == "generate-int8" and "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | did not run: {r['error'].splitlines()[-1][:120]} | | | | |")
        elif "cold" in r:
            continue
        else:
            ratio = f" ({r['output_tok_s'] / base:.1f}x)" if base else ""
            t, p = r["ttft_s"], r["tpot_ms"]
            lines.append(f"| {r['mode']} | {r['output_tok_s']:.1f}{ratio} | {t['p50']:.2f} / {t['p90']:.2f} / "
                         f"{t['p99']:.2f} | {p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f} | {r['wall_s']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    for r in results:
        if "cold" in r:
            cold, warm = r["cold"], r["cached"]
            lines += ["", f"Prefix cache ({len(spec['shared'])} requests sharing a {len(spec['shared'][0]) - 50}-token "
                      f"prefix, one at a time, int8): TTFT without the cache {cold['rest_mean_s']:.2f} s, with it "
                      f"{warm['rest_mean_s']:.2f} s ({warm['rest_mean_s'] / cold['rest_mean_s']:.2f}x; the first "
                      f"request {warm['first_s']:.2f} s), {warm['hits']} prompt tokens served from the cache."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, nargs=2, default=[100, 1000])
    parser.add_argument("--output", type=int, nargs=2, default=[64, 128])
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--prefix-requests", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=900, help="seconds a mode may take")
    parser.add_argument("--proxy-layers", type=int, help="a random model of the default widths with this many "
                        "layers instead of the default model (not for hf-cb-bf16)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.out.write_text(json.dumps(run_worker(args.worker, json.loads(args.spec.read_text()))))
        return
    spec = _workload(args)
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        results.append(run_mode(mode, spec))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(report(results, spec))


if __name__ == "__main__":
    main()
