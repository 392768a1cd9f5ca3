"""Speculative decoding (prompt lookup) against plain greedy decoding, ours and the peers', in one run.

Two workloads on the default model, greedy, batch 1, stopping at the end of the answer (or --new-tokens):
- code editing: "rewrite this function with <small change>" around 20 real Python functions of 50-90 lines
  (benchmarks/data/code_edit_prompts.json: CPython's standard library, PSF License), where answers copy the prompt;
- open-ended chat: questions whose answers share little with the prompt (speculation must not slow them down).
Per engine: decode tok/s (tokens after the first / time after the first), and for ours the draft acceptance rate
(accepted / drafted tokens). Ours: `--scheme` (int8 by default) plain vs `prompt_lookup_num_tokens`; peers:
transformers' own `prompt_lookup_num_tokens` (bf16, its GGUF load) and llama.cpp's `LlamaPromptLookupDecoding`
through llama-cpp-python (skipped with a note when it is not installed). Ours' greedy answers with and without
speculation are compared token for token.

    flock /tmp/qwen2-heavy.lock python benchmarks/bench_speculative.py --code-prompts 8 --chat-prompts 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

import qwen2
from qwen2.generation.speculative import last_speculation_stats
from qwen2.loading.default_model import default_model_path

from engines import _FirstTokenTimer  # noqa: E402 (benchmarks/ is the script's directory)

DATA = Path(__file__).resolve().parent / "data" / "code_edit_prompts.json"
CHAT = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between TCP and UDP? Explain in a few paragraphs.",
    "Give me ten ideas for a weekend trip with children.",
    "Explain how a hash map works and when it is a poor choice.",
    "Describe the water cycle for a ten-year-old.",
    "What should I consider when choosing a database for a new web application?",
    "Write a motivational speech for a team before a product launch.",
    "Compare functional and object-oriented programming, with their strengths.",
]


def torch_run(model: Any, ids: list[int], new_tokens: int, eos: int, **options: Any) -> tuple[list[int], float]:
    """(answer tokens, decode tok/s after the first token) of one greedy generate()."""
    timer = _FirstTokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos, streamer=timer, **options)
    end = time.perf_counter()
    answer = out[0, len(ids):].tolist()
    return answer, (len(answer) - 1) / (end - (timer.first or start))


def llama_run(llm: Any, ids: list[int], new_tokens: int, eos: int) -> tuple[int, float]:
    """(answer tokens, decode tok/s after the first) of llama.cpp's greedy loop (with its draft model if set)."""
    llm.reset()  # no reuse of a cached prompt prefix
    first, count, start = None, 0, time.perf_counter()
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        first = first or time.perf_counter()
        count += 1
        if token == eos or count == new_tokens:
            break
    return count, (count - 1) / (time.perf_counter() - (first or start))


def summarise(rates: dict[str, list[float]], tokens: dict[str, list[int]]) -> dict[str, float]:
    """Token-weighted decode tok/s per engine over the workload."""
    result = {}
    for engine, values in rates.items():
        counts = tokens[engine]
        seconds = sum((n - 1) / r for n, r in zip(counts, values) if r > 0)
        result[engine] = sum(n - 1 for n in counts) / seconds if seconds else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="int8", choices=("bf16", "int8", "int4"))
    parser.add_argument("--code-prompts", type=int, default=20)
    parser.add_argument("--chat-prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (all engines)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", default="hf,llamacpp", help="comma-separated: hf, llamacpp (or none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf = default_model_path(progress=False)
    tokenizer = qwen2.AutoTokenizer.from_pretrained(str(gguf))
    data = json.loads(DATA.read_text())
    code = [f"{p['instruction']}\n\n```python\n{p['code']}```" for p in data["prompts"][:args.code_prompts]]
    workloads = {"code editing": code, "chat": CHAT[:args.chat_prompts]}
    encoded = {name: [list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                         add_generation_prompt=True, return_dict=True)["input_ids"])
                      for text in texts]
               for name, texts in workloads.items()}
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    print(f"torch {torch.__version__}, {args.threads} threads, ours {args.scheme}, prompt_lookup_num_tokens="
          f"{args.lookup}, up to {args.new_tokens} new tokens, load average {os.getloadavg()[0]:.1f}")

    rates: dict[str, dict[str, list[float]]] = {w: {} for w in workloads}
    tokens: dict[str, dict[str, list[int]]] = {w: {} for w in workloads}
    acceptance: dict[str, list[int]] = {w: [0, 0] for w in workloads}
    mismatches: list[str] = []

    def record(workload: str, engine: str, count: int, rate: float) -> None:
        rates[workload].setdefault(engine, []).append(rate)
        tokens[workload].setdefault(engine, []).append(count)
        print(f"  {workload}, {engine}: {count} tokens, {rate:.1f} tok/s", flush=True)  # partial runs still tell

    ours_name = f"ours {args.scheme}"
    model = qwen2.Qwen2ForCausalLM.from_pretrained(str(gguf), dtype=torch.bfloat16,
                                                   quantization=None if args.scheme == "bf16" else args.scheme).eval()
    # Warm-up, untimed: the compiled decode step and the compiled verification step, each at two cache sizes
    # (dynamo compiles a second time, with the cache length dynamic, when it first sees another size).
    for ids in [rows[0] for rows in encoded.values() if rows]:
        for options in ({}, {"prompt_lookup_num_tokens": args.lookup}):
            torch_run(model, ids, args.new_tokens, eos, disable_compile=False, **options)
    print(f"warmed up; load average {os.getloadavg()[0]:.1f}", flush=True)
    for workload, rows in encoded.items():
        for index, ids in enumerate(rows):
            plain, rate = torch_run(model, ids, args.new_tokens, eos, disable_compile=False)
            record(workload, f"{ours_name} plain", len(plain), rate)
            spec, rate = torch_run(model, ids, args.new_tokens, eos, disable_compile=False,
                                   prompt_lookup_num_tokens=args.lookup)
            record(workload, f"{ours_name} lookup", len(spec), rate)
            stats = last_speculation_stats()
            acceptance[workload][0] += stats.accepted
            acceptance[workload][1] += stats.drafted
            if plain != spec:
                first = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
                mismatches.append(f"{workload} prompt {index} (token {first})")
    del model
    gc.collect()

    peers = {p.strip() for p in args.peers.split(",")}
    if "hf" in peers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                               dtype=torch.bfloat16).eval()
        for workload, rows in encoded.items():
            for ids in rows:
                answer, rate = torch_run(hf, ids, args.new_tokens, eos, prompt_lookup_num_tokens=args.lookup)
                record(workload, "transformers bf16 lookup", len(answer), rate)
        del hf
        gc.collect()
    if "llamacpp" in peers:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError:
            print("llama.cpp column skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
        else:
            try:
                lookup = LlamaPromptLookupDecoding(num_pred_tokens=args.lookup)
                for label, draft in (("plain", None), ("lookup", lookup)):
                    llm = Llama(model_path=str(gguf), n_ctx=4096, n_batch=2048, n_ubatch=512, n_threads=args.threads,
                                n_threads_batch=args.threads, draft_model=draft, logits_all=draft is not None,
                                verbose=False)
                    for workload, rows in encoded.items():
                        for ids in rows:
                            count, rate = llama_run(llm, ids, args.new_tokens, eos)
                            record(workload, f"llama.cpp {label}", count, rate)
                    del llm
            except Exception as err:  # noqa: BLE001 - a peer's failure must not lose the figures measured
                print(f"llama.cpp column incomplete: {type(err).__name__}: {err}")

    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    for workload in workloads:
        summary = summarise(rates[workload], tokens[workload])
        base = summary[f"{ours_name} plain"]
        accepted, drafted = acceptance[workload]
        print(f"\n{workload}: {len(encoded[workload])} prompts, acceptance (ours) {accepted}/{drafted} = "
              f"{accepted / max(drafted, 1):.0%}")
        for engine, value in summary.items():
            print(f"  {engine:28s} {value:7.1f} tok/s  {value / base:5.2f}x ours plain")
    print(f"\nours' greedy answers with and without speculation differ on {len(mismatches)} prompt(s)"
          + (f": {', '.join(mismatches)}" if mismatches else ""))


if __name__ == "__main__":
    main()
