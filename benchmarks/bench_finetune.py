"""LoRA SFT training speed and memory: qwen2.training vs transformers' Trainer + peft, in one run.

    python benchmarks/bench_finetune.py                      # batch 2 x 256 tokens, 4 timed steps each
    python benchmarks/bench_finetune.py --batch 4 --length 512 --steps 6 --no-bf16

Both sides train the default model (Qwen2.5-Coder-0.5B-Instruct, float32 weights, bf16 autocast unless
--no-bf16) from the same safetensors directory (written once from the GGUF), each in its own subprocess so peak
RSS is its own, with the same hyper-parameters: LoRA r=16 alpha=32 dropout 0.05 on all linears of the
decoder layers, AdamW lr 2e-4, cosine schedule, gradient clipping 1.0, the same token ids and the same labels
(loss on the answer half only). Tokens/s counts every input token (prompt and answer) of the timed steps (the
first step is warm-up, not timed). Peak RSS is the high-water mark while training (reset after loading).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def model_dir() -> Path:
    """The default model as a safetensors directory (both sides load it the same way)."""
    directory = Path(os.environ.get("QWEN2_BENCH_DIR", "/tmp/qwen2-bench-finetune-model"))
    if not (directory / "model.safetensors").is_file():
        import torch

        import qwen2
        from qwen2.loading.default_model import default_model_path

        gguf = default_model_path()
        qwen2.Qwen2ForCausalLM.from_pretrained(str(gguf), dtype=torch.float32).save_pretrained(directory)
        qwen2.AutoTokenizer.from_pretrained(str(gguf)).save_pretrained(directory)
    return directory


def batches(spec: dict) -> list[tuple[list[list[int]], list[list[int]]]]:
    """(ids, labels) per step: random token ids; labels = ids on the answer half, -100 on the prompt."""
    import torch

    generator = torch.Generator().manual_seed(0)
    half = spec["length"] // 2
    out = []
    for _ in range(spec["steps"] + 1):
        ids = torch.randint(100, 150000, (spec["batch"], spec["length"]), generator=generator)
        labels = ids.clone()
        labels[:, :half] = -100
        out.append((ids.tolist(), labels.tolist()))
    return out


def run_ours(spec: dict) -> dict:
    import torch

    import qwen2
    from qwen2.training import Trainer, TrainingConfig, prepare_model
    from qwen2.training.encode import Example

    model = qwen2.Qwen2ForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = prepare_model(model, "sft", lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target=TARGETS)
    examples = [Example(ids, targets=labels[1:] + [-100])  # targets are the shifted labels
                for step_ids, step_labels in batches(spec) for ids, labels in zip(step_ids, step_labels)]
    times: list[float] = []
    config = TrainingConfig(task="sft", learning_rate=2e-4, batch_size=spec["batch"], max_steps=spec["steps"] + 1,
                            bf16=spec["bf16"], progress=False, shuffle=False)
    trainer = Trainer(model, config, examples, pad_id=0, callbacks=[lambda t, r: times.append(time.perf_counter())])
    _reset_peak_rss()
    trainer.train()
    return {"seconds": times[-1] - times[0], "losses": [h["loss"] for h in trainer.history],
            "peak_rss_mb": _peak_rss_mb()}


def run_transformers(spec: dict) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=TARGETS))
    dataset = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
               for step_ids, step_labels in batches(spec) for ids, labels in zip(step_ids, step_labels)]
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = transformers.TrainingArguments(
        output_dir="/tmp/qwen2-bench-finetune-hf", max_steps=spec["steps"] + 1,
        per_device_train_batch_size=spec["batch"], learning_rate=2e-4, lr_scheduler_type="cosine",
        max_grad_norm=1.0, bf16=spec["bf16"], use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_drop_last=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(dataset)
    _reset_peak_rss()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": times[-1] - times[0], "losses": losses, "peak_rss_mb": _peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--worker", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (run_ours if args.worker == "ours" else run_transformers)(json.loads(args.spec))
        print("RESULT " + json.dumps(result))
        return
    spec = {"model": str(model_dir()), "batch": args.batch, "length": args.length, "steps": args.steps,
            "bf16": args.bf16}
    results = {}
    for side in ("transformers", "ours"):
        run = subprocess.run([sys.executable, __file__, "--worker", side, "--spec", json.dumps(spec)],
                             capture_output=True, text=True, check=False)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} failed:\n{run.stderr[-4000:]}")
        results[side] = json.loads(line[len("RESULT "):])
    tokens = args.batch * args.length * args.steps
    print(f"LoRA SFT, default model, batch {args.batch} x {args.length} tokens, {args.steps} timed steps, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, {os.cpu_count()} CPUs")
    print(f"{'':<28}{'tokens/s':>10}{'peak RSS MB':>14}   losses")
    for side in ("transformers", "ours"):
        r = results[side]
        label = "transformers Trainer + peft" if side == "transformers" else "qwen2.training"
        print(f"{label:<28}{tokens / r['seconds']:>10.1f}{r['peak_rss_mb']:>14.0f}   "
              + " ".join(f"{x:.3f}" for x in r["losses"]))
    ours, theirs = results["ours"], results["transformers"]
    print(f"{'ratio (ours / transformers)':<28}{theirs['seconds'] / ours['seconds']:>9.2f}x"
          f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:>13.2f}x")


if __name__ == "__main__":
    main()
