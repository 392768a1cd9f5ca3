"""Tensor parallelism on this machine: the default model at TP 1 and TP 2, and the planning model's prediction.

    python benchmarks/bench_tp.py [--gguf PATH] [--prompt 128] [--new-tokens 32]

Runs, each in processes of its own (greedy, bf16, eager decode: TP does not use the compiled step):
- tp1 x1: one process, 1 thread: calibrates the planning model (bytes/s streamed, FLOP/s in prefill);
- tp1 x2: one process, 2 threads (what one process does with the machine);
- tp2: two ranks of 1 thread each (gloo on loopback), which also time their collectives: the all-reduce of
  one token's hidden state, the gather of the vocabulary slices, and a prompt's all-reduce.
The prediction for tp2 (docs/scaling.md): each rank streams half the weights at the 1-thread rate, plus
the measured collectives: decode = (W/2)/B1 + (2L+1) x allreduce + gather; prefill likewise from the
1-thread FLOP rate and the prompt-sized all-reduce.
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


def _measure(model, prompt: int, new_tokens: int) -> dict:
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, min(model.config.vocab_size, 10000), (1, prompt))
    with torch.inference_mode():
        model(ids[:, :8], logits_to_keep=1)  # warm-up
        prefill = min(_timed(lambda: model(ids, logits_to_keep=1)) for _ in range(2))
    short = ids[:, :16]
    run = dict(do_sample=False, disable_compile=True, eos_token_id=None, pad_token_id=0)
    first = min(_timed(lambda: model.generate(short, max_new_tokens=1, min_new_tokens=1, **run)) for _ in range(2))
    total = _timed(lambda: model.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **run))
    return {"prefill_s": prefill, "prefill_tok_s": prompt / prefill,
            "decode_tok_s": (new_tokens - 1) / (total - first), "decode_s": (total - first) / (new_tokens - 1)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _collectives(config, prompt: int) -> dict:
    """Seconds per call of the collectives one decode step (and one prefill) makes."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    hidden = torch.ones(1, 1, config.hidden_size, dtype=torch.bfloat16)
    vocab = torch.ones(1, 1, -(-config.vocab_size // world), dtype=torch.bfloat16)
    prompt_hidden = torch.ones(1, prompt, config.hidden_size, dtype=torch.bfloat16)
    parts = [torch.empty_like(vocab) for _ in range(world)]

    def per_call(fn, n: int) -> float:
        for _ in range(5):
            fn()
        dist.barrier()
        return _timed(lambda: [fn() for _ in range(n)]) / n

    return {"allreduce_token_s": per_call(lambda: dist.all_reduce(hidden), 300),
            "gather_vocab_s": per_call(lambda: dist.all_gather(parts, vocab), 50),
            "allreduce_prompt_s": per_call(lambda: dist.all_reduce(prompt_hidden), 20)}


def _dtensor_vs_explicit(model, rounds: int = 30) -> dict:
    """Why explicit slices rather than DTensor: the default model's first MLP (this rank's slices, as loaded)
    against the same MLP under `parallelize_module` (ColwiseParallel gate/up, RowwiseParallel down), one
    bf16 row, seconds per call. Both give the same sums."""
    import copy

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mine = model.model.layers[0].mlp
    world = dist.get_world_size()
    full = copy.deepcopy(mine)  # rebuild the whole MLP from every rank's slices, then let DTensor split it
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        part = getattr(mine, name).weight.detach().contiguous()
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        weight = torch.cat(parts, dim=dim)
        setattr(full, name, nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype))
        getattr(full, name).weight = nn.Parameter(weight, requires_grad=False)
    mesh = init_device_mesh("cpu", (world,))
    dtensor = parallelize_module(full, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                              "down_proj": RowwiseParallel()})
    x = torch.randn(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    dist.broadcast(x, 0)

    def timed(module) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            for _ in range(3):
                out = module(x)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(rounds):
                out = module(x)
            dist.barrier()
        return (time.perf_counter() - start) / rounds, out

    explicit_s, explicit = timed(mine)
    dtensor_s, theirs = timed(dtensor)
    theirs = theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs
    return {"mlp_explicit_s": explicit_s, "mlp_dtensor_s": dtensor_s,
            "mlp_max_diff": float((explicit.float() - theirs.float()).abs().max())}


def worker(args: argparse.Namespace) -> None:
    import torch

    from qwen2.model import Qwen2ForCausalLM

    torch.set_num_threads(args.threads)
    tp = "RANK" in os.environ
    options = {"tp_plan": "auto"} if tp else {}
    model = Qwen2ForCausalLM.from_pretrained(args.gguf, dtype=torch.bfloat16, **options)
    result = _measure(model, args.prompt, args.new_tokens)
    if tp:
        import torch.distributed as dist

        result.update(_collectives(model.config, args.prompt))
        result.update(_dtensor_vs_explicit(model))
        if dist.get_rank() != 0:
            dist.barrier()
            os._exit(0)  # no interpreter teardown: DTensor's collectives can abort it ("terminate called")
    c = model.config
    result["weight_bytes"] = 2 * sum(p.numel() for p in model.parameters())  # this rank's, bf16
    result["layers"] = c.num_hidden_layers
    result["prompt"] = args.prompt
    result["params_non_embedding"] = c.num_hidden_layers * (
        c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    result["params_head"] = c.hidden_size * c.vocab_size
    Path(args.out).write_text(json.dumps(result))
    if tp:
        dist.barrier()
        os._exit(0)


def _run(name: str, args: argparse.Namespace, threads: int, ranks: int) -> dict:
    from qwen2.distributed.launch import launch, wait

    out = Path(tempfile.mkdtemp()) / f"{name}.json"
    argv = [__file__, "--worker", "--gguf", str(args.gguf), "--prompt", str(args.prompt), "--new-tokens",
            str(args.new_tokens), "--threads", str(threads), "--out", str(out)]
    if ranks == 1:
        subprocess.run([sys.executable, *argv], check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    elif wait(launch(argv, ranks, threads), timeout=1800) != 0:
        raise SystemExit(f"{name}: a rank failed")
    return json.loads(out.read_text())


def predict_tp2(one: dict, comm: dict) -> dict:
    """docs/scaling.md's model, calibrated by the 1-thread run (B1 bytes/s streamed in decode, F1 FLOP/s in
    prefill) and the collectives measured in the tp2 run: each of the 2 ranks does half the work on its own
    core, then the 2L+1 all-reduces (o_proj, down_proj per layer, the embedding) and the vocabulary gather."""
    bandwidth = one["weight_bytes"] / one["decode_s"]
    flop_rate = 2 * one["params_non_embedding"] * one["prompt"] / one["prefill_s"]
    collectives = (2 * one["layers"] + 1) * comm["allreduce_token_s"] + comm["gather_vocab_s"]
    decode = one["weight_bytes"] / 2 / bandwidth + collectives
    prefill = one["prefill_s"] / 2 + (2 * one["layers"] + 1) * comm["allreduce_prompt_s"]
    return {"decode_tok_s": 1 / decode, "prefill_tok_s": one["prompt"] / prefill,
            "collectives_per_token_s": collectives, "bandwidth": bandwidth, "flop_rate": flop_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="default: the embedded default model")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gguf is None:
        from qwen2.loading.default_model import default_model_path

        args.gguf = default_model_path(progress=False)
    if args.worker:
        worker(args)
        return
    one = _run("tp1x1", args, 1, 1)
    two_threads = _run("tp1x2", args, 2, 1)
    tp2 = _run("tp2", args, 1, 2)
    predicted = predict_tp2(one, tp2)
    print(f"default model, bf16, prompt {args.prompt} tokens, {args.new_tokens} greedy new tokens (eager)")
    print(f"{'run':<28}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for name, row in (("TP1, 1 thread", one), ("TP1, 2 threads", two_threads), ("TP2, 1 thread/rank", tp2),
                      ("TP2 predicted (model)", predicted)):
        print(f"{name:<28}{row['prefill_tok_s']:>15.1f}{row['decode_tok_s']:>14.2f}")
    print(f"TP2 / TP1x2: prefill {tp2['prefill_tok_s'] / two_threads['prefill_tok_s']:.2f}x, "
          f"decode {tp2['decode_tok_s'] / two_threads['decode_tok_s']:.2f}x")
    print(f"collectives (gloo, loopback): all-reduce of one token's hidden state {tp2['allreduce_token_s'] * 1e6:.0f} "
          f"us, vocabulary gather {tp2['gather_vocab_s'] * 1e6:.0f} us, prompt all-reduce "
          f"{tp2['allreduce_prompt_s'] * 1e3:.2f} ms; per decoded token "
          f"{predicted['collectives_per_token_s'] * 1e3:.2f} ms "
          f"({predicted['collectives_per_token_s'] / tp2['decode_s']:.0%} of a TP2 step)")
    print(f"one MLP layer at one row, 2 ranks: explicit slices + all-reduce {tp2['mlp_explicit_s'] * 1e6:.0f} us, "
          f"DTensor parallelize_module {tp2['mlp_dtensor_s'] * 1e6:.0f} us (max difference {tp2['mlp_max_diff']:.3g})")
    print(f"calibration (TP1, 1 thread): {predicted['bandwidth'] / 1e9:.1f} GB/s of weights streamed in decode, "
          f"{predicted['flop_rate'] / 1e9:.0f} GFLOP/s in prefill")


if __name__ == "__main__":
    main()
