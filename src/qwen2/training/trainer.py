"""The training loop: AdamW with warmup and cosine/linear decay, gradient accumulation, bf16 autocast,
evaluation and checkpoints every N steps, a stop on SIGTERM/Ctrl-C that saves first, and data parallelism.

Batches are a pure function of (seed, step): the examples (or packed rows) are read in a seeded permutation per
epoch, one stream across epochs, and optimizer step s, micro-batch m, process r takes its slice of it. So a
resumed run needs only the step to continue on the same data, and N processes with batch B/N see exactly the
batch one process with batch B sees.

The loss of an optimizer step is the sum over every learned position (sft: assistant tokens; tag: labelled
first sub-tokens; classify: sequences) of all its micro-batches and processes, divided by their total count, so
accumulation and data parallelism change nothing but speed. The causal LM computes logits only at the
positions that are learned (`logits_to_keep` with a mask), which skips the vocabulary projection and its
float32 softmax for every prompt and padding token.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qwen2.training import checkpoint, distributed
from qwen2.training.collate import pack, packed_batch, pad_batch
from qwen2.training.encode import IGNORE, Example
from qwen2.training.metrics import accuracy, entity_f1, macro_f1

logger = logging.getLogger(__name__)
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainingConfig:
    """Hyper-parameters of a run (the CLI's options, by the same names)."""

    task: str = "sft"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    batch_size: int = 4  # per process
    grad_accum: int = 1
    max_steps: int | None = None  # default: `epochs` over the training data
    epochs: float = 1.0
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    seed: int = 0
    shuffle: bool = True  # a seeded permutation per epoch; False reads the examples in order
    pack: bool = False
    max_length: int = 1024  # the length of a packed row
    eval_steps: int | None = None
    save_steps: int | None = None
    keep_checkpoints: int | None = None
    logging_steps: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in ("sft", "classify", "tag"):
            raise ValueError(f"task must be sft, classify or tag, got {self.task!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "logging_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.epochs <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("learning_rate and epochs must be positive, warmup_steps and weight_decay >= 0")
        if self.pack and self.task == "classify":
            raise ValueError("packing applies to sft and tag, not to classify (one label per sequence)")


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False  # by SIGTERM / Ctrl-C, after saving a checkpoint
    checkpoint: Path | None = None


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the learning rate at `step`: linear warmup from 0, then cosine or linear decay to 0."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


class Trainer:
    """Fine-tunes `model` (a qwen2 model, peft-wrapped or not: see `prepare_model`) on tokenized examples.

    >>> trainer = Trainer(model, TrainingConfig(task="sft", max_steps=100), train, eval_examples=held_out,
    ...                   pad_id=tokenizer.pad_token_id, output_dir="out")
    >>> result = trainer.train()          # or train(resume_from="out") after an interruption
    >>> trainer.evaluate()                # {'loss': ...} (+ accuracy/f1 for classify, entity f1 for tag)
    """

    def __init__(self, model: torch.nn.Module, config: TrainingConfig, train_examples: Sequence[Example],
                 eval_examples: Sequence[Example] | None = None, pad_id: int = 0,
                 output_dir: str | Path | None = None, label_names: Sequence[str] | None = None,
                 callbacks: Sequence[Callable[[Trainer, dict[str, Any]], None]] = ()) -> None:
        if not train_examples:
            raise ValueError("no training examples")
        self.model, self.config, self.pad_id = model, config, pad_id
        model_pad = getattr(getattr(model, "config", None), "pad_token_id", pad_id)
        if config.task == "classify" and model_pad != pad_id:
            # the head pools each row's last token that is not config.pad_token_id: padding with another id
            # would pool a padding position
            raise ValueError(f"pad_id {pad_id} differs from the model's config.pad_token_id {model_pad}: "
                             "set model.config.pad_token_id = tokenizer.pad_token_id")
        self.eval_examples = list(eval_examples or [])
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.label_names = list(label_names or [])
        self.callbacks = list(callbacks)
        self.rank, self.world = distributed.rank_and_world()
        self.device = next(model.parameters()).device
        examples = list(train_examples)
        self.units: list[Any] = pack(examples, config.max_length) if config.pack else examples
        per_step = config.batch_size * config.grad_accum * self.world
        self.max_steps = config.max_steps or max(1, math.ceil(config.epochs * len(self.units) / per_step))
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW([p for _, p in self.trainable], lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup_steps, self.max_steps, config.schedule))
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._stop_requested = False
        self._permutations: dict[int, list[int]] = {}
        self._ddp = distributed.wrap(model, self.device)

    # ---- data -------------------------------------------------------------------------------------
    def _unit(self, index: int) -> Any:
        epoch, at = divmod(index, len(self.units))
        if not self.config.shuffle:
            return self.units[at]
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.config.seed * 1000003 + epoch)
            self._permutations[epoch] = torch.randperm(len(self.units), generator=generator).tolist()
        return self.units[self._permutations[epoch][at]]

    def _batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        size = self.config.batch_size
        start = ((step * self.config.grad_accum + micro) * self.world + self.rank) * size
        units = [self._unit(i) for i in range(start, start + size)]
        batch = packed_batch(units, self.pad_id) if self.config.pack else pad_batch(units, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- loss -------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, logits at the learned positions (sft) or all logits)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if self.config.task == "sft":
            keep = batch["targets"] != IGNORE  # (B, T)
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (N, V)
            return F.cross_entropy(logits.float(), batch["targets"][keep], reduction="sum"), logits
        logits = model(**inputs, use_cache=False).logits
        if self.config.task == "classify":  # (B, L)
            return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), logits
        flat = logits.float().view(-1, logits.shape[-1])  # (B*T, L)
        return F.cross_entropy(flat, batch["targets"].view(-1), ignore_index=IGNORE, reduction="sum"), logits

    @staticmethod
    def _items(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["targets"] != IGNORE).sum() if "targets" in batch else torch.tensor(len(batch["labels"]))

    def _train_step(self) -> dict[str, Any]:
        micro = [self._batch(self.step, m) for m in range(self.config.grad_accum)]
        counts = distributed.all_sum(torch.stack([self._items(b).cpu() for b in micro]
                                                 + [sum(b["tokens"].cpu() for b in micro)]).double())
        items, tokens = max(float(counts[:-1].sum()), 1.0), int(counts[-1])
        self._ddp.train()
        total = torch.zeros((), dtype=torch.float64)
        for index, batch in enumerate(micro):
            last = index == len(micro) - 1
            sync = contextlib.nullcontext() if last or self._ddp is self.model else self._ddp.no_sync()
            with sync:
                with self._autocast():
                    loss_sum, _ = self._forward(self._ddp, batch)
                # DDP averages gradients over processes: scaling by world makes them sum / items.
                (loss_sum * (self.world / items)).backward()
            total += loss_sum.detach().double().cpu()
        norm = None
        if self.config.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], self.config.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(distributed.all_sum(total)) / items
        return {"step": self.step + 1, "loss": loss, "lr": lr, "tokens": tokens, "grad_norm": norm}

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example] | None = None) -> dict[str, float]:
        """Loss on `examples` (default: the eval set), with accuracy and macro F1 (classify) or entity
        precision/recall/F1 (tag)."""
        examples = list(examples if examples is not None else self.eval_examples)
        if not examples:
            raise ValueError("no evaluation examples")
        was_training = self.model.training
        self.model.eval()
        loss, items = 0.0, 0.0
        predictions, references = [], []
        try:
            for start in range(0, len(examples), self.config.batch_size):
                chunk = examples[start:start + self.config.batch_size]
                batch = {k: v.to(self.device) for k, v in pad_batch(chunk, self.pad_id).items()}
                with self._autocast():
                    loss_sum, logits = self._forward(self.model, batch)
                loss += float(loss_sum)
                items += float(self._items(batch))
                if self.config.task == "classify":
                    predictions += logits.argmax(-1).tolist()
                    references += batch["labels"].tolist()
                elif self.config.task == "tag":
                    guesses = logits.argmax(-1)
                    for row, example in enumerate(chunk):
                        kept = [(g, t) for g, t in zip(guesses[row].tolist(), example.targets) if t != IGNORE]
                        predictions.append([self._name(g) for g, _ in kept])
                        references.append([self._name(t) for _, t in kept])
        finally:
            self.model.train(was_training)
        metrics = {"loss": loss / max(items, 1.0)}
        if self.config.task == "classify":
            metrics.update(accuracy=accuracy(predictions, references), f1=macro_f1(predictions, references))
        elif self.config.task == "tag":
            metrics.update({f"entity_{k}": v for k, v in entity_f1(predictions, references).items()})
        return metrics

    def _name(self, label: int) -> str:
        return self.label_names[label] if label < len(self.label_names) else str(label)

    # ---- checkpoints ------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.output_dir / "checkpoints" if self.output_dir is not None else None

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every process contributes its RNG state)."""
        rngs = distributed.gather(checkpoint.rng_state())
        path = None
        if self.rank == 0 and self.checkpoint_dir is not None:
            path = checkpoint.save_checkpoint(
                self.checkpoint_dir, self.step, dict(self.trainable), self.optimizer.state_dict(),
                self.scheduler.state_dict(), rngs,
                {"history": self.history, "world_size": self.world, "config": asdict(self.config)},
                keep=self.config.keep_checkpoints)
            logger.info("checkpoint saved: %s", path)
        distributed.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        saved = checkpoint.load_checkpoint(path)
        state = saved["state"]
        if state["world_size"] != self.world:
            raise ValueError(f"{path} was written by {state['world_size']} process(es), this run has {self.world}: "
                             "resuming step for step needs the same number")
        names = {n for n, _ in self.trainable}
        if set(saved["weights"]) != names:
            raise ValueError(f"{path} does not hold this model's trainable weights (different model, LoRA "
                             "settings or task?)")
        with torch.no_grad():
            for name, parameter in self.trainable:
                parameter.copy_(saved["weights"][name])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        checkpoint.set_rng_state(saved["rng"][self.rank])
        self.step, self.history = state["step"], state["history"]
        logger.info("resumed from %s at step %d", path, self.step)

    # ---- the loop ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        logger.warning("%s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)
        self._stop_requested = True

    @contextlib.contextmanager
    def _signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def train(self, resume_from: str | Path | None = None) -> TrainResult:
        """Train to `max_steps` (from a checkpoint's step with `resume_from`); on SIGTERM/Ctrl-C save a
        checkpoint and return with `stopped=True`."""
        if resume_from is not None:
            self.load_checkpoint(checkpoint.resolve_resume(resume_from, self.output_dir or resume_from))
        else:
            torch.manual_seed(self.config.seed + self.rank)
            random.seed(self.config.seed + self.rank)
        progress = self._progress()
        started, tokens = time.perf_counter(), 0
        result = TrainResult(self.step, self.history)
        with self._signals():
            while self.step < self.max_steps:
                record = self._train_step()
                self.step += 1
                tokens += record["tokens"]
                record["tokens_per_s"] = tokens / (time.perf_counter() - started)
                self.history.append(record)
                self._report(progress, record)
                if self.config.eval_steps and self.eval_examples and self.step % self.config.eval_steps == 0:
                    self._log_eval()
                for callback in self.callbacks:
                    callback(self, record)
                stop = distributed.any_process(self._stop_requested)
                if stop or (self.config.save_steps and self.step % self.config.save_steps == 0):
                    result.checkpoint = self.save_checkpoint()
                if stop:
                    result.stopped = True
                    break
        if progress is not None:
            progress.close()
        result.step = self.step
        return result

    def _progress(self) -> Any:
        if self.rank != 0 or not self.config.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.max_steps, initial=self.step, desc=f"finetune {self.config.task}", unit="step")

    def _report(self, progress: Any, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
        if record["step"] % self.config.logging_steps == 0 or record["step"] == self.max_steps:
            logger.info("step %d/%d loss %.4f lr %.3g tokens/s %.0f", record["step"], self.max_steps,
                        record["loss"], record["lr"], record["tokens_per_s"])

    def _log_eval(self) -> None:
        if self.rank == 0:
            metrics = self.evaluate()
            self.history.append({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
            logger.info("step %d eval %s", self.step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        distributed.barrier()
