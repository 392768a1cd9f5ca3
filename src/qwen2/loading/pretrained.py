"""`PreTrainedModel`: from_pretrained / save_pretrained shared by every Qwen2 head.

STUB: the loading helper fills this in (safetensors, sharding, hub, GGUF, dtype, device_map).
"""

from __future__ import annotations

import torch
from torch import nn


class PreTrainedModel(nn.Module):
    config_class: type | None = None
    base_model_prefix = "model"

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
