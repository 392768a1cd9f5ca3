"""What `generate(return_dict_in_generate=True)` returns: transformers 5.x's output classes and field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwen2.outputs import ModelOutput, _accepts_past_key_values


@_accepts_past_key_values
@dataclass(eq=False)
class GenerateDecoderOnlyOutput(ModelOutput):
    """Greedy / sampling: `sequences` (N, L); `scores`/`logits`: one (N, V) tensor per new token."""

    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[Any, ...] | None = None
    hidden_states: tuple[Any, ...] | None = None
    cache: Any = None


@_accepts_past_key_values
@dataclass(eq=False)
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """Beam search: also the final beam scores and, per new token, which beam each token extended."""

    sequences: torch.Tensor | None = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple[Any, ...] | None = None
    hidden_states: tuple[Any, ...] | None = None
    cache: Any = None
