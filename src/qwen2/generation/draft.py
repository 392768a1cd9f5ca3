"""Drafters for speculative decoding: who proposes the tokens the model then verifies in one forward pass.

- `PromptLookupDrafter`: n-gram lookup in the sequence so far (prompt and output), transformers'
  `prompt_lookup_num_tokens` / `max_matching_ngram_size` semantics: the last n tokens (n from
  `max_matching_ngram_size` down to 1) are searched left to right, the first earlier occurrence with a
  continuation gives up to `k` tokens, cut before an end-of-sequence token. Its draft distribution is one-hot.
- `AssistantDrafter`: a smaller model with the same vocabulary proposes `k` tokens one by one on its own
  static cache (kept across steps and cropped back past what the model rejected), stopping early when its
  top probability falls below `assistant_confidence_threshold`. When sampling it returns the distributions
  it sampled from, which the acceptance rule needs.
"""

from __future__ import annotations

from typing import Any

import torch

from qwen2.generation.fast import DecodeLinears, cache_length
from qwen2.generation.logits import LogitsProcessor, apply_processors


class PromptLookupDrafter:
    """Proposes the continuation of the latest n-gram's first earlier occurrence (no model, no cost)."""

    uses_distributions = False

    def __init__(self, max_ngram: int, eos_token_id: torch.Tensor | None) -> None:
        self.max_ngram = max_ngram
        self.eos_token_id = eos_token_id

    def propose(self, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to `k` draft tokens (D,) following `ids` (L,); D = 0 when nothing matches."""
        length = ids.shape[0]
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            windows = ids.unfold(0, n, 1)  # (L - n + 1, n)
            starts = (windows == ids[-n:]).all(dim=1).nonzero().flatten() + n
            starts = starts[starts < length]  # the n-gram itself (at the end) has no continuation
            if starts.numel():
                start = int(starts[0])
                draft = ids[start:start + k]
                if self.eos_token_id is not None:
                    eos = torch.isin(draft, self.eos_token_id).nonzero()
                    if eos.numel():
                        draft = draft[:int(eos[0])]
                if draft.numel():
                    return draft, None
        return ids[:0], None

    def rollback(self, length: int) -> None:
        """Nothing to undo: the lookup keeps no state."""


class AssistantDrafter:
    """A small model drafting greedily (or by sampling, returning the distributions it sampled from)."""

    uses_distributions = True

    def __init__(self, assistant: Any, max_length: int, processors: list[LogitsProcessor], do_sample: bool,
                 generator: torch.Generator | None, confidence_threshold: float | None) -> None:
        from qwen2.cache import StaticCache

        self.assistant = assistant
        self.cache = StaticCache(assistant.config, max_batch_size=1, max_cache_len=cache_length(max_length))
        self.processors = processors
        self.do_sample = do_sample
        self.generator = generator
        self.threshold = confidence_threshold
        self.seen = 0  # tokens of the sequence the assistant's cache holds

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the tokens the assistant has not seen yet; (V,) float32 logits of the next token."""
        new = ids[self.seen:]
        positions = torch.arange(self.seen, ids.shape[0], device=ids.device)
        with DecodeLinears():
            output = self.assistant(input_ids=new[None], past_key_values=self.cache, use_cache=True,
                                    cache_position=positions, position_ids=positions[None], logits_to_keep=1)
        self.seen = ids.shape[0]
        return output.logits[0, -1].float()

    def propose(self, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to `k` draft tokens (D,), and when sampling the (D, V) probabilities each was drawn from."""
        drafted: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        sequence = ids
        for _ in range(k):
            scores = apply_processors(self.processors, sequence[None], self._forward(sequence)[None])[0]
            p = torch.softmax(scores, dim=-1)
            if self.do_sample:
                token = torch.multinomial(p, 1, generator=self.generator)
            else:
                token = scores.argmax(dim=-1, keepdim=True)
            if self.threshold and drafted and float(p[token]) < self.threshold:
                break  # not confident: verifying it would likely waste the position
            drafted.append(token)
            probs.append(p)
            sequence = torch.cat([sequence, token])
        if not drafted:
            return ids[:0], None
        return torch.cat(drafted), torch.stack(probs) if self.do_sample else None

    def rollback(self, length: int) -> None:
        """The sequence is now `length` tokens long and agrees with what the assistant saw up to there."""
        if self.seen > length:
            self.cache.crop(length)
            self.seen = length
