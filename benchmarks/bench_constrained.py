"""Decode throughput with and without a JSON-schema constraint (qwen2.constrained), same run: generate() with
the logits processor, and the serving engine with `structured_outputs` (batch 1 and 16 by default).

The constraint's cost per step is the masks (llguidance, all rows in one parallel call; the engine computes
them beside the forward), the history lookup (generate()) and the masking of the (rows, vocabulary) logits.
The schema asks for a long array so every row decodes many tokens; rates are rows x steps / decode time
(prefill subtracted), as in bench_decode.py. The unconstrained and constrained runs alternate for `--rounds` rounds
and each rate is the median of its rounds, so a change of load between them hits both alike. Check `uptime`: on
busy cores the numbers move a lot.

    flock /tmp/qwen2-heavy.lock python benchmarks/bench_constrained.py --batch 1 16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch

import qwen2
from qwen2.constrained import ConstrainedLogitsProcessor
from qwen2.loading.default_model import default_model_path
from qwen2.serving import SamplingParams, StructuredOutputsParams
from qwen2.serving.engine import EngineConfig, LLMEngine

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                       "name": {"type": "string", "maxLength": 16}},
                                     "required": ["id", "name"], "additionalProperties": False},
          "minItems": 8, "maxItems": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--only", choices=("generate", "engine"), help="measure one of the two (default both)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    path = str(default_model_path())
    model = qwen2.Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = qwen2.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "List eight users as JSON objects with an id and a name."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(prompt, torch.Tensor):
        prompt = prompt["input_ids"]

    def run(ids: torch.Tensor, n: int, processors: list) -> tuple[float, int]:
        for processor in processors:
            processor.reset()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=0 if processors else n, do_sample=False,
                             disable_compile=True, logits_processor=processors)
        return time.perf_counter() - start, out.shape[1] - ids.shape[1]

    print(f"torch {torch.__version__}, {args.dtype}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    start = time.perf_counter()
    constraint = ConstrainedLogitsProcessor(tokenizer, json_schema=SCHEMA, eos_token_id=[tokenizer.eos_token_id])
    print(f"constraint built in {time.perf_counter() - start:.2f} s (tokenizer table included, cached after)")
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max(args.batch), kv_cache_memory=512 << 20))
    structured = StructuredOutputsParams(json=SCHEMA)
    for batch in args.batch:
        ids = prompt.repeat(batch, 1)
        if args.only != "engine":
            measures = {}
            for label, processors in (("unconstrained", []), ("json_schema", [constraint])):
                run(ids, 2, processors)  # warm up
                prefill = min(run(ids, 1, processors)[0] for _ in range(2))
                measures[label] = lambda processors=processors, prefill=prefill: _decode_rate(
                    run(ids, args.new_tokens, processors), prefill, batch)
            _cost("generate()", batch, _alternate(measures, args.rounds))
        if args.only != "generate":
            measures = {}
            for label, constrained in (("unconstrained", None), ("json_schema", structured)):
                params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=constrained is None,
                                        structured_outputs=constrained)
                engine_rate(engine, prompt[0].tolist(), batch, 4, params)  # warm up
                measures[label] = lambda params=params: engine_rate(engine, prompt[0].tolist(), batch,
                                                                    args.new_tokens, params)
            _cost("engine", batch, _alternate(measures, args.rounds))


def engine_rate(engine: LLMEngine, ids: list[int], batch: int, new_tokens: int, params: SamplingParams) -> float:
    """Tokens per second from the step where every request has its first token to the end."""
    params = dataclasses.replace(params, max_tokens=new_tokens)
    for i in range(batch):
        engine.add_request(str(i), ids, params)
    generated = {str(i): 0 for i in range(batch)}
    start = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            generated[output.request_id] = len(output.outputs[0].token_ids)
        if start is None and all(generated.values()):
            start, at_start = time.perf_counter(), sum(generated.values())
    return (sum(generated.values()) - at_start) / (time.perf_counter() - start)


def _decode_rate(run: tuple[float, int], prefill: float, batch: int) -> float:
    total, steps = run
    return batch * (steps - 1) / (total - prefill)


def _alternate(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each label's rates over `rounds` rounds that run the labels in turn."""
    rates: dict[str, list[float]] = {label: [] for label in measures}
    for _ in range(rounds):
        for label, measure in measures.items():
            rates[label].append(measure())
    return rates


def _cost(path: str, batch: int, rates: dict[str, list[float]]) -> None:
    median = {label: statistics.median(values) for label, values in rates.items()}
    for label, values in rates.items():
        print(f"{path} batch {batch}: {label:13s} decode {median[label]:.1f} tok/s (median of "
              f"{', '.join(f'{v:.1f}' for v in values)}), load average {os.getloadavg()[0]:.1f}")
    print(f"{path} batch {batch}: the constraint costs "
          f"{100 * (1 - median['json_schema'] / median['unconstrained']):.1f}% of decode throughput")


if __name__ == "__main__":
    main()
