"""transformers' generation helpers beside `generate()`: `prepare_inputs_for_generation` (which peft and
hand-written decode loops call) and `compute_transition_scores` (the score of each chosen token).

Semantics of transformers 5.24 (`generation/utils.py`); qwen2's own `generate()` does not go through
`prepare_inputs_for_generation` (its loop builds the model inputs itself), so overriding it changes nothing there.
"""

from __future__ import annotations

from typing import Any

import torch

_NEVER_FORWARDED = ("labels", "next_sequence_length")


class GenerationApiMixin:
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The forward() arguments for the next step: the last `next_sequence_length` tokens (the prompt's
        embeddings instead on the first iteration when given), the cache, positions cut to the same length, the
        mask, and every other keyword passed through."""
        inputs: dict[str, Any] = {}
        if inputs_embeds is not None and is_first_iteration:
            embeds = inputs_embeds if next_sequence_length is None else inputs_embeds[:, -next_sequence_length:]
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = embeds.clone(memory_format=torch.contiguous_format)
            length = embeds.shape[1]
        else:
            ids = input_ids if next_sequence_length is None else input_ids[:, -next_sequence_length:]
            inputs["input_ids"] = ids.clone(memory_format=torch.contiguous_format)
            length = ids.shape[1]
        if cache is not None:
            inputs["cache"] = cache
        for name in ("position_ids", "token_type_ids"):
            value = kwargs.pop(name, None)
            if value is not None:
                if value.shape[-1] != length:
                    value = value[..., -length:].clone(memory_format=torch.contiguous_format)
                inputs[name] = value
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        for key, value in kwargs.items():
            if key not in _NEVER_FORWARDED and key not in inputs:
                inputs[key] = value
        return inputs

    def compute_transition_scores(
        self,
        sequences: torch.Tensor,
        scores: tuple[torch.Tensor, ...],
        beam_indices: torch.Tensor | None = None,
        normalize_logits: bool = False,
    ) -> torch.Tensor:
        """(rows, new tokens): the score each generated token had at its step (from `generate(...,
        output_scores=True, return_dict_in_generate=True)`); with beam search pass the output's `beam_indices`.
        `normalize_logits` turns raw scores into log-probabilities first. Steps a finished beam skipped are 0."""
        if not scores:
            raise ValueError("scores is empty: generate with output_scores=True and return_dict_in_generate=True")
        stacked = torch.stack(scores, dim=1)  # (N, T, V), N = batch * beams
        if normalize_logits:
            stacked = torch.log_softmax(stacked, dim=-1)
        if beam_indices is None:
            beam_indices = torch.arange(stacked.shape[0], device=sequences.device)[:, None].expand(-1, len(scores))
        finished = beam_indices < 0
        steps = int((~finished).sum(-1).max())
        beams, finished = beam_indices[:, :steps].clamp(min=0), finished[:, :steps]
        tokens = sequences[:, sequences.shape[-1] - steps:]  # (rows, steps)
        step_index = torch.arange(steps, device=tokens.device).expand_as(tokens)
        chosen = stacked.to(tokens.device)[beams, step_index, tokens]
        return chosen.masked_fill(finished, 0)
