"""Generation speed and quality: ours (bf16, int8, int4) vs transformers (bf16, fp32) vs llama.cpp, in one run.

    python benchmarks/bench_generate.py                        # everything (~15 min on 2 cores)
    python benchmarks/bench_generate.py --quick --engines ours-int4,llamacpp

Each engine runs in its own subprocess (so peak RSS is its own), on the same GGUF, the same token ids and
the same thread count. Speed: load time (ours: plus a one-off compile of the batch-1 decode step, shown
apart), prefill tok/s at each prompt length (last-position logits only, as generation does), time to
first token, greedy decode tok/s at batch 1 and 8 (new tokens after the first, EOS ignored; the best of
`--repeats` runs, for every engine alike), peak RSS.
Quality, against transformers float32 (run first when selected): the free-running greedy continuation of
the seed chat prompt (how many leading tokens agree), top-1 agreement under teacher forcing on that
reference, and perplexity on benchmarks/fixed_text.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED_MESSAGES = [{"role": "user", "content": "Give me a short introduction to large language model."}]


def default_gguf() -> Path:
    from qwen2.loading.default_model import default_model_path

    return default_model_path()


# ---------------------------------------------------------------------------------------------------- worker


def other_runnable_tasks(samples: int = 10) -> int:
    """Runnable tasks besides this one (the 4th field of /proc/loadavg, least of a few samples over 1 s).

    Unlike the load average, it does not still count the engine that ran just before."""
    counts = []
    for _ in range(samples):
        with open("/proc/loadavg", encoding="ascii") as f:
            counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        time.sleep(1 / samples)
    return min(counts)


def run_worker(name: str, spec: dict) -> dict:
    """Measure one engine; everything it needs is in `spec` (token ids included)."""
    import torch

    from engines import make_engine, memory_mb

    engine = make_engine(name, Path(spec["gguf"]), spec["threads"], spec["group_size"], spec["n_ctx"])
    result: dict = {"engine": name, "other_runnable": other_runnable_tasks(), **engine.load()}

    text = spec["text_ids"]
    engine.prefill(text[:128])  # warm-up: first-call allocations and kernel selection
    engine.generate([spec["decode_prompts"][0]], 4)
    result["prefill_tok_s"] = {}
    for length in spec["prefill_lengths"]:
        times = []
        for _ in range(1 if length > 512 else 2):
            start = time.perf_counter()
            engine.prefill(text[:length])
            times.append(time.perf_counter() - start)
        result["prefill_tok_s"][str(length)] = length / min(times)

    _, _, result["ttft_s"] = engine.generate([text[:spec["ttft_length"]]], 1, time_first=True)
    result["decode_tok_s"] = {}
    n = spec["decode_tokens"]
    for batch in spec["batches"]:
        prompts = spec["decode_prompts"][:batch]
        rates = []
        try:
            for _ in range(spec["repeats"]):  # best of a few: a shared machine's stalls only ever slow a run down
                if batch == 1:
                    _, total, first = engine.generate(prompts, n, time_first=True)
                else:
                    _, first, _ = engine.generate(prompts, 1)
                    _, total, _ = engine.generate(prompts, n)
                rates.append(batch * (n - 1) / (total - first))
        except NotImplementedError as err:
            result["decode_tok_s"][str(batch)] = None
            result.setdefault("notes", []).append(str(err))
            continue
        result["decode_tok_s"][str(batch)] = max(rates)
    result["peak_rss_mb"] = memory_mb()["peak_rss_mb"]

    if spec["quality"]:
        seed = spec["seed_ids"]
        greedy, _, _ = engine.generate([seed], spec["greedy_tokens"], stop_at_eos=True)
        result["greedy"] = greedy[0]
        if engine.name == "ours-bf16":  # the plain path, which the quantised ones are held to as well
            result["greedy_eager"] = engine.generate([seed], spec["greedy_tokens"], stop_at_eos=True, eager=True)[0][0]
        reference = spec.get("reference")
        if reference:
            logits = engine.logits(seed + reference)[len(seed) - 1:-1]
            result["teacher_forced_agreement"] = (logits.argmax(-1) == torch.tensor(reference)).float().mean().item()
        logits = engine.logits(spec["ppl_ids"])
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(spec["ppl_ids"][1:]))
        result["perplexity"] = math.exp(nll.item())
    engine.close()
    return result


# ---------------------------------------------------------------------------------------------------- parent


def build_spec(args: argparse.Namespace, gguf: Path) -> dict:
    """Tokenise every prompt once (transformers' tokenizer of the same GGUF), so all engines get the same ids."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = (HERE / "fixed_text.txt").read_text(encoding="utf-8")
    text_ids = tokenizer(text)["input_ids"]
    longest = max(args.prefill + [args.ttft_length])
    repeated = text_ids * (longest // len(text_ids) + 1)
    window = 32
    decode_prompts = [text_ids[i * window:(i + 1) * window] for i in range(max(args.batch))]
    seed = tokenizer.apply_chat_template(SEED_MESSAGES, add_generation_prompt=True, tokenize=False)
    return {
        "gguf": str(gguf), "threads": args.threads, "group_size": args.group_size,
        "n_ctx": longest + args.decode_tokens + 64,
        "text_ids": repeated[:longest], "prefill_lengths": args.prefill, "ttft_length": args.ttft_length,
        "decode_prompts": decode_prompts, "decode_tokens": args.decode_tokens, "batches": args.batch,
        "quality": not args.no_quality, "seed_ids": tokenizer(seed)["input_ids"],
        "greedy_tokens": args.greedy_tokens, "ppl_ids": text_ids[:args.ppl_tokens], "repeats": args.repeats,
    }


def run_engine(name: str, spec: dict, threads: int) -> dict:
    """Run one engine in a fresh interpreter and return its result (or the error it died with)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name,
                               "--spec", str(spec_path), "--out", str(out_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out_path.exists():
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            return {"engine": name, "error": f"exit code {proc.returncode}:\n{tail}"}
        result = json.loads(out_path.read_text())
        result["wall_s"] = time.perf_counter() - start
        return result


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _leading_agreement(tokens: list[int], reference: list[int]) -> int:
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


def report(results: list[dict], spec: dict) -> str:
    """Markdown tables: speed, ratios against transformers bf16 and llama.cpp, quality."""
    ok = {r["engine"]: r for r in results if "error" not in r}
    lines = [f"Threads: {spec['threads']}; decode: {spec['decode_tokens']} new tokens after a 32-token prompt, best of "
             f"{spec['repeats']} runs; "
             f"TTFT on a {spec['ttft_length']}-token prompt; int4 group size {spec['group_size']}.", ""]
    lengths = [str(n) for n in spec["prefill_lengths"]]
    batches = [str(b) for b in spec["batches"]]
    lines.append("| engine | load s | compile s | peak RSS load / run MB | weights MB | "
                 + " | ".join(f"prefill {n} tok/s" for n in lengths) + " | TTFT ms | "
                 + " | ".join(f"decode b{b} tok/s" for b in batches) + " |")
    lines.append("|" + "---|" * (6 + len(lengths) + len(batches)))
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed: {r['error'].splitlines()[-1][:150]} |")
            continue
        lines.append(
            f"| {r['engine']} | {_fmt(r['load_s'])} | {_fmt(r.get('compile_s'))} | "
            f"{r['load_peak_rss_mb']:.0f} / {r['peak_rss_mb']:.0f} | "
            f"{r['weight_mb']:.0f} | " + " | ".join(_fmt(r["prefill_tok_s"].get(n)) for n in lengths)
            + f" | {_fmt(r['ttft_s'] * 1e3 if r.get('ttft_s') else None, 0)} | "
            + " | ".join(_fmt(r["decode_tok_s"].get(b)) for b in batches) + " |")

    for base in ("hf-bf16", "llamacpp"):
        if base not in ok:
            continue
        lines += ["", f"Ratios to {base} (higher is better):", "",
                  "| engine | " + " | ".join(f"prefill {n}" for n in lengths) + " | "
                  + " | ".join(f"decode b{b}" for b in batches) + " |",
                  "|" + "---|" * (1 + len(lengths) + len(batches))]
        b = ok[base]
        for r in ok.values():
            if r["engine"] == base:
                continue
            ratios = [_ratio(r["prefill_tok_s"].get(n), b["prefill_tok_s"].get(n)) for n in lengths]
            ratios += [_ratio(r["decode_tok_s"].get(x), b["decode_tok_s"].get(x)) for x in batches]
            lines.append(f"| {r['engine']} | " + " | ".join(ratios) + " |")
    busy = [f"{r['engine']} ({r['other_runnable']})" for r in ok.values() if r["other_runnable"] > 0]
    if busy:
        lines.append(f"\nWARNING: other processes were running when these engines started (runnable tasks "
                     f"besides the engine: {', '.join(busy)}); their speed figures are not trustworthy.")
    for r in ok.values():
        d = r["decode_tok_s"]
        if d.get("1") and d.get("8"):
            lines.append(f"\n{r['engine']}: batch-8 decode is {d['8'] / d['1']:.2f}x its batch-1 tokens/s.")

    if spec["quality"]:
        reference = spec.get("reference")
        references = [reference, ok.get("ours-bf16", {}).get("greedy"), ok.get("ours-bf16", {}).get("greedy_eager")]
        lines += ["", "| engine | leading greedy tokens equal to hf-fp32's | ... to ours-bf16's | ... to ours-bf16 "
                      f"eager's | teacher-forced top-1 agreement with hf-fp32 | perplexity ({len(spec['ppl_ids'])} "
                      "tokens) |",
                  "|---|---|---|---|---|---|"]
        for r in ok.values():
            if "perplexity" not in r:
                continue
            leads = [f"{_leading_agreement(r['greedy'], ref)} / {len(ref)}" if ref else "-" for ref in references]
            tf = r.get("teacher_forced_agreement")
            lines.append(f"| {r['engine']} | {' | '.join(leads)} | {_fmt(tf * 100 if tf is not None else None)}% | "
                         f"{r['perplexity']:.3f} |")
    return "\n".join(lines)


def _ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> None:
    from engines import ENGINES, llama_cpp_available

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the embedded default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128, 256)")
    parser.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--ttft-length", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per batch size; the best is reported")
    parser.add_argument("--greedy-tokens", type=int, default=256)
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    parser.add_argument("--no-quality", action="store_true", help="speed only")
    parser.add_argument("--quick", action="store_true",
                        help="prefill 128/512, 32 decode tokens, batch 1, one decode run, 64 greedy tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = run_worker(args.worker, json.loads(args.spec.read_text()))
        args.out.write_text(json.dumps(result))
        return
    if args.quick:
        args.prefill, args.decode_tokens, args.batch, args.greedy_tokens, args.repeats = [128, 512], 32, [1], 64, 1

    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose from {','.join(ENGINES)}")
    if "llamacpp" in names and (why := llama_cpp_available()):
        print(f"Skipping llamacpp: {why}")
        names.remove("llamacpp")
    names.sort(key=lambda n: n != "hf-fp32")  # the quality reference runs first
    gguf = args.gguf or default_gguf()
    spec = build_spec(args, gguf)
    if any(n.startswith("ours") for n in names):
        from qwen2.loading.hub import resolve_model_dir

        resolve_model_dir(str(gguf))  # first-use set-up (hash, config), untimed: the benchmark measures a cached load
    results = []
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        result = run_engine(name, spec, args.threads)
        if name == "hf-fp32" and "greedy" in result:
            spec["reference"] = result["greedy"]
        if "error" in result:
            print(f"  {name} failed: {result['error']}", flush=True)
        results.append(result)
    print()
    print(report(results, spec))
    if args.json:
        args.json.write_text(json.dumps({"spec": {k: v for k, v in spec.items() if not k.endswith("_ids")},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
