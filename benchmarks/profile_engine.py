"""Where the serving engine's time goes at bench_serve.py's concurrency-16 level, without HTTP: the same seeded
prompts through the engine in-process, every step timed and classed as prefill only, mixed (prefill chunks with
decode rows) or decode only; optionally torch.profiler's operator table over a few steps of one class.

    python benchmarks/profile_engine.py --quantization int8                  # the step split, ~1.5 min
    python benchmarks/profile_engine.py --quantization bf16 --profile decode --profile-steps 20
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KINDS = ("prefill", "mixed", "decode")


@dataclass
class Split:
    """Seconds and tokens per step class, the wall time, and the greedy outputs (request order)."""

    wall: float = 0.0
    seconds: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    steps: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    tokens: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    outputs: list = field(default_factory=list)

    def report(self, label: str) -> str:
        out = sum(len(o) for o in self.outputs)
        lines = [f"{label}: wall {self.wall:.2f} s, {out / self.wall:.1f} out tok/s, load {os.getloadavg()[0]:.2f}, "
                 f"outputs {hashlib.sha1(repr(self.outputs).encode()).hexdigest()[:10]}"]
        for kind in KINDS:
            if self.steps[kind]:
                lines.append(f"  {kind:8s} {self.steps[kind]:4d} steps {self.seconds[kind]:7.2f} s "
                             f"{self.tokens[kind]:6d} tokens  {1000 * self.seconds[kind] / self.steps[kind]:7.1f} ms/step")
        return "\n".join(lines)


def step_kind(engine) -> str:
    """The class of the step about to run, from the scheduler's state."""
    running = engine.scheduler.running
    prefilling = engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in running)
    decoding = any(s.num_uncomputed_tokens == 1 and s.num_output_tokens for s in running)
    return ("mixed" if decoding else "prefill") if prefilling else "decode"


def run(engine, prompts: list[list[int]], output_len: int, profile: str = "none", profile_steps: int = 10) -> Split:
    """The prompts all at once (as at concurrency = len(prompts)), greedy, EOS ignored, to the end."""
    import torch

    from qwen2 import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    offset = len(engine._requests) + int(time.time() * 1000)  # fresh request ids per call
    ids = [f"r{offset}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile != "none" else None
    profiled = 0
    split = Split()
    results = {}
    scheduled = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        scheduled.append(schedule())
        return scheduled[-1]

    engine.scheduler.schedule = recording_schedule  # the instance attribute shadows the method
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        kind = step_kind(engine)
        profiling = profiler is not None and profiled < profile_steps and profile in ("all", kind)
        if profiling and profiled == 0:
            profiler.start()
        t0 = time.perf_counter()
        outputs = engine.step()
        split.seconds[kind] += time.perf_counter() - t0
        split.steps[kind] += 1
        split.tokens[kind] += sum(scheduled.pop().num_tokens) if scheduled else 0
        if profiling:
            profiled += 1
            if profiled == profile_steps:
                profiler.stop()
        for out in outputs:
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    split.wall = time.perf_counter() - start
    del engine.scheduler.schedule
    split.outputs = [results[i] for i in ids]
    if profiler is not None and profiled:
        if profiled < profile_steps:
            profiler.stop()
        print(f"torch.profiler over {profiled} {profile} steps:")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return split


def setup(quantization: str, concurrency: int, budget: int | None):
    """(engine on the default GGUF, bench_serve's prompts for this concurrency as token ids), warmed up."""
    import torch

    from bench_serve import workload
    from qwen2 import AutoModelForCausalLM, AutoTokenizer, SamplingParams
    from qwen2.loading.default_model import default_model_path
    from qwen2.serving.engine import EngineConfig, LLMEngine

    gguf = default_model_path(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf))
    model = AutoModelForCausalLM.from_pretrained(str(gguf), dtype=torch.bfloat16,
                                                 quantization=None if quantization == "bf16" else quantization).eval()
    prompts = [tokenizer.encode(p) for p in workload(gguf, concurrency, (100, 1000), concurrency)]
    warm = tokenizer.encode(workload(gguf, 1, (100, 1000), -concurrency)[0])
    # as bench_serve's servers (the context fits the prompts); no prefix cache, so a second run computes its
    # prompts again (bench_serve's prompts are all new to the server)
    config = {"max_num_seqs": 32, "max_model_len": 1400, "enable_prefix_caching": False}
    if budget:
        config["max_num_batched_tokens"] = budget
    engine = LLMEngine(model, tokenizer, EngineConfig(**config))
    engine.add_request("warm", warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return engine, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", default="int8", help="int8, w8a8, or bf16")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--budget", type=int, default=None, help="max_num_batched_tokens (default: the engine's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", choices=["none", *KINDS, "all"], default="none")
    parser.add_argument("--profile-steps", type=int, default=10)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    engine, prompts = setup(args.quantization, args.concurrency, args.budget)
    split = run(engine, prompts, args.output_len, args.profile, args.profile_steps)
    print(split.report(f"{args.quantization} budget {engine.config.max_num_batched_tokens}"))


if __name__ == "__main__":
    main()
