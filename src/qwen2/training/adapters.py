"""The model side of fine-tuning: LoRA through peft or full training, and what is written at the end.

peft is an optional dependency (`pip install 'qwen2[train]'`), imported only when LoRA is asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# peft's task types: which head is trained and, for the classifiers, kept whole (modules_to_save = the head).
PEFT_TASK_TYPES = {"sft": "CAUSAL_LM", "classify": "SEQ_CLS", "tag": "TOKEN_CLS"}
# "all-linear" spelled out: peft finds the output layer to leave out only on transformers' own classes, so on
# ours it would also adapt lm_head (tied to the embeddings: a vocabulary-sized adapter).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'qwen2[train]' (or pip install peft), "
                          "or train all weights with method='full' (--full)") from None
    return peft


def prepare_model(model: torch.nn.Module, task: str, method: str = "lora", lora_r: int = 8,
                  lora_alpha: float = 16, lora_dropout: float = 0.05,
                  lora_target: str | list[str] | None = "all-linear",
                  gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The module to train: `model` wrapped by peft (LoRA on `lora_target`, the classification head trained
    whole) or, for method='full', `model` itself with every weight trainable."""
    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if method == "lora":  # the frozen embeddings' output must require grad for checkpointed layers' LoRA
            model.enable_input_require_grads()
    if method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    peft = _peft()
    targets = ALL_LINEAR if lora_target == "all-linear" else lora_target
    config = peft.LoraConfig(task_type=PEFT_TASK_TYPES[task], r=lora_r, lora_alpha=lora_alpha,
                             lora_dropout=lora_dropout, target_modules=targets)
    wrapped = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA r=%d alpha=%g on %s: %d of %d parameters trainable (%.2f%%)", lora_r, lora_alpha,
                lora_target or "peft's defaults", trainable, total, 100 * trainable / total)
    return wrapped


def is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_model(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None, merge: bool = False) -> Path:
    """Write the result: a peft adapter (adapter_config.json + adapter_model.safetensors) for LoRA, or the whole
    model for full training; with `merge`, also `directory/merged`, a plain model directory (LoRA folded into the
    weights) that qwen2 and transformers load. Merging changes `model` in place, so it is the last thing done.
    Returns the directory of the loadable model (merged if asked)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if not (merge and is_peft(model)):
        return directory
    merged_dir = directory / "merged"
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(merged_dir)
    return merged_dir
