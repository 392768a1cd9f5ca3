"""Decode throughput with and without a JSON-schema constraint (qwen2.constrained), same run, batch 1 and 4.

The constraint's cost per step is the masks (llguidance, all rows in one parallel call), the history lookup
and the masking of the (rows, vocabulary) logits. The schema asks for a long array so every row decodes many
tokens; rates are rows x steps / decode time (prefill subtracted), as in bench_decode.py. Check `uptime`:
on busy cores the numbers move a lot.

    flock /tmp/qwen2-heavy.lock python benchmarks/bench_constrained.py --batch 1 4
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import qwen2
from qwen2.constrained import ConstrainedLogitsProcessor
from qwen2.loading.default_model import default_model_path

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                       "name": {"type": "string", "maxLength": 16}},
                                     "required": ["id", "name"], "additionalProperties": False},
          "minItems": 8, "maxItems": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
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
    for batch in args.batch:
        ids = prompt.repeat(batch, 1)
        rates = {}
        for label, processors in (("unconstrained", []), ("json_schema", [constraint])):
            run(ids, 2, processors)  # warm up
            prefill = min(run(ids, 1, processors)[0] for _ in range(2))
            total, steps = run(ids, args.new_tokens, processors)
            rates[label] = batch * (steps - 1) / (total - prefill)
            print(f"batch {batch}: {label:13s} decode {rates[label]:.1f} tok/s over {steps} steps, "
                  f"load average {os.getloadavg()[0]:.1f}")
        print(f"batch {batch}: the constraint costs {100 * (1 - rates['json_schema'] / rates['unconstrained']):.1f}% "
              "of decode throughput")


if __name__ == "__main__":
    main()
