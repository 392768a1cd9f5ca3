"""Fine-tuning Qwen2 models: chat SFT, sequence classification and token tagging, LoRA (peft) or full.

    from qwen2.training import read_dataset, encode_dataset, prepare_model, Trainer, TrainingConfig, save_model

The `qwen2 finetune` command (qwen2.training.cli) is a thin layer over these.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "qwen2.training.data",
    "Dataset": "qwen2.training.data",
    "read_dataset": "qwen2.training.data",
    "Example": "qwen2.training.encode",
    "encode_dataset": "qwen2.training.encode",
    "prepare_model": "qwen2.training.adapters",
    "save_model": "qwen2.training.adapters",
    "Trainer": "qwen2.training.trainer",
    "TrainingConfig": "qwen2.training.trainer",
    "TrainResult": "qwen2.training.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen2.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
