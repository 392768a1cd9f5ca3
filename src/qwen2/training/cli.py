"""`qwen2 finetune TASK --data FILE --output DIR`: a thin layer over qwen2.training (listed in
qwen2/cli/main.py's SUBCOMMANDS). The data are read and checked before the model is loaded; under `torchrun` or
`accelerate launch` every process runs this same command and rank 0 alone writes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from qwen2.cli.options import positive_int

logger = logging.getLogger("qwen2.training")
_MODEL_CLASSES = {"sft": "AutoModelForCausalLM", "classify": "AutoModelForSequenceClassification",
                  "tag": "AutoModelForTokenClassification"}


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("finetune", parents=[common], help="fine-tune a model: chat SFT, classify, tag",
                                 description="Fine-tune with LoRA (peft) or all weights. Data: sft = JSONL "
                                             "{'messages': [...]}; classify = CSV/JSONL text,label[,text_pair]; "
                                             "tag = JSONL {'tokens': [...], 'tags': [...]}.")
    parser.set_defaults(run=cmd_finetune)
    parser.add_argument("task", choices=("sft", "classify", "tag"), help="what to train")
    parser.add_argument("--model", "-m", default=None,
                        help="local directory, .gguf file or hub id (default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory")
    parser.add_argument("--data", required=True, type=Path, help="training file (.jsonl, or .csv for classify)")
    parser.add_argument("--eval-data", type=Path, default=None, help="held-out file evaluated every --eval-steps")
    parser.add_argument("--output", "-o", required=True, type=Path,
                        help="directory for the adapter (or the full model), checkpoints/ and the merged model")
    data = parser.add_argument_group("data")
    data.add_argument("--labels", default=None,
                      help="comma-separated label set (classify/tag); other labels are errors (default: those found)")
    data.add_argument("--max-length", type=positive_int, default=1024, help="tokens per sequence (default: 1024)")
    data.add_argument("--too-long", choices=("truncate", "refuse"), default="truncate",
                      help="longer sequences: cut them (and report how many) or refuse the file (default: truncate)")
    data.add_argument("--pack", action="store_true",
                      help="pack several sequences into each --max-length row (sft/tag; attention stays within each)")
    method = parser.add_argument_group("method")
    method.add_argument("--full", action="store_true", help="train all weights instead of a LoRA adapter")
    method.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank (default: 8)")
    method.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="LoRA alpha (default: 16)")
    method.add_argument("--lora-dropout", type=_fraction, default=0.05, help="LoRA dropout (default: 0.05)")
    method.add_argument("--lora-target", default="all-linear",
                        help="comma-separated module names, or all-linear (default: all-linear)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=_positive_float, default=2e-4, help="peak learning rate (default: 2e-4)")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default: 0)")
    optim.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine",
                       help="learning-rate decay after warmup (default: cosine)")
    optim.add_argument("--batch-size", type=positive_int, default=4, help="sequences per process and micro-batch")
    optim.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--epochs", type=_positive_float, default=1.0, help="passes over the data (default: 1)")
    optim.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    optim.add_argument("--max-grad-norm", type=_positive_float, default=1.0, help="gradient clipping (default: 1)")
    optim.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    optim.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights stay float32)")
    optim.add_argument("--seed", type=int, default=0, help="seeds the head/LoRA init, data order and dropout")
    optim.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    run = parser.add_argument_group("run")
    run.add_argument("--eval-steps", type=positive_int, default=None, help="evaluate every N steps")
    run.add_argument("--save-steps", type=positive_int, default=None, help="checkpoint every N steps")
    run.add_argument("--keep-checkpoints", type=positive_int, default=None, help="keep only the newest N checkpoints")
    run.add_argument("--logging-steps", type=positive_int, default=10, help="log every N steps (default: 10)")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                     help="continue from a checkpoint (default: the newest under --output)")
    run.add_argument("--merge", action="store_true", help="also write --output/merged: the adapter folded in")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read(args: argparse.Namespace) -> tuple[Any, Any]:
    from qwen2.training.data import read_dataset

    labels = [name.strip() for name in args.labels.split(",") if name.strip()] if args.labels else None
    train = read_dataset(args.data, args.task, labels)
    held_out = read_dataset(args.eval_data, args.task, train.labels) if args.eval_data is not None else None
    return train, held_out


def _load(args: argparse.Namespace, labels: list[str]) -> tuple[Any, Any]:
    import torch

    import qwen2
    from qwen2.cli.options import model_source

    source, gguf_file = model_source(args)
    tokenizer = qwen2.AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    extra: dict[str, Any] = {}
    if args.task != "sft":
        extra = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={name: i for i, name in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)  # the new head's initial weights
    model = getattr(qwen2, _MODEL_CLASSES[args.task]).from_pretrained(
        source, gguf_file=gguf_file, dtype=torch.float32, **extra)
    return model, tokenizer


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from qwen2.training import distributed
    from qwen2.training.adapters import prepare_model, save_model
    from qwen2.training.encode import encode_dataset
    from qwen2.training.trainer import Trainer, TrainingConfig

    if args.threads is not None:
        from qwen2.cli.options import clamp_threads

        torch.set_num_threads(clamp_threads(args.threads))
    logging.getLogger("qwen2.training").setLevel(logging.INFO)
    config = TrainingConfig(
        task=args.task, learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        schedule=args.schedule, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
        epochs=args.epochs, max_grad_norm=args.max_grad_norm, bf16=args.bf16, seed=args.seed, pack=args.pack,
        max_length=args.max_length, eval_steps=args.eval_steps, save_steps=args.save_steps,
        keep_checkpoints=args.keep_checkpoints, logging_steps=args.logging_steps, progress=not args.no_progress)
    train_data, eval_data = _read(args)  # before the model: bad data is refused in seconds
    created = distributed.init_from_environment()
    try:
        model, tokenizer = _load(args, train_data.labels)
        train = encode_dataset(tokenizer, train_data, args.max_length, args.too_long)
        held_out = encode_dataset(tokenizer, eval_data, args.max_length, args.too_long, train_data.labels) \
            if eval_data is not None else None
        targets = args.lora_target if args.lora_target == "all-linear" else \
            [name.strip() for name in args.lora_target.split(",") if name.strip()]
        torch.manual_seed(args.seed)  # the LoRA weights' initialisation
        model = prepare_model(model, args.task, "full" if args.full else "lora", args.lora_r, args.lora_alpha,
                              args.lora_dropout, targets, args.gradient_checkpointing)
        trainer = Trainer(model, config, train, held_out, pad_id=tokenizer.pad_token_id, output_dir=args.output,
                          label_names=train_data.labels)
        resume = None if args.resume is None else (args.resume or args.output)
        result = trainer.train(resume_from=resume)
        if result.stopped:
            logger.warning("stopped at step %d; continue with --resume %s", result.step, result.checkpoint or args.output)
            return 130
        if held_out is not None and trainer.rank == 0:
            metrics = trainer.evaluate()
            logger.info("final eval: %s", " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if trainer.rank == 0:
            written = save_model(model, args.output, tokenizer, merge=args.merge)
            logger.info("saved to %s", written)
        distributed.barrier()
        return 0
    finally:
        if created:
            torch.distributed.destroy_process_group()
