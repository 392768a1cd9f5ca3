"""The prompt of a generate() call given other than as token ids: as embeddings (`inputs_embeds=`), or partly
already processed in a cache the user holds (`past_key_values=`, e.g. a shared system prompt run once).

As transformers 5.24 does it: with `inputs_embeds` alone the output holds only the new tokens, and length limits
count new tokens; with a cache, `input_ids` is the whole prompt and only the tokens past the cache's length are
run. generate() itself decodes on its own preallocated cache: the user's cache is copied in first, and extended
in place with the tokens generated afterwards (as transformers extends it), so it can be passed to the next turn.
"""

from __future__ import annotations

from typing import Any

import torch


def take_prompt_embeds(model: Any, input_ids: torch.Tensor | None, inputs_embeds: Any) -> torch.Tensor:
    """Validated (B, L, hidden) prompt embeddings; with `input_ids` too, both must describe the same tokens."""
    hidden = model.config.hidden_size
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden \
            or not inputs_embeds.is_floating_point():
        shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
        raise ValueError(f"`inputs_embeds` must be a float tensor of shape (batch, length, {hidden}), got {shape}.")
    if inputs_embeds.shape[1] == 0:
        raise ValueError("`inputs_embeds` is empty: generate() needs at least one prompt position.")
    if input_ids is not None and input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"`input_ids` {tuple(input_ids.shape)} and `inputs_embeds` {tuple(inputs_embeds.shape)} "
                         "must cover the same prompt positions.")
    return inputs_embeds


def cached_length(model: Any, cache: Any, batch_size: int, prompt_length: int, expand: int) -> int:
    """How many prompt tokens `cache` already holds, after checking generate() can continue from it."""
    if not hasattr(cache, "layers") or not hasattr(cache, "get_seq_length"):
        raise ValueError(f"`past_key_values` must be a qwen2 DynamicCache or StaticCache, got {type(cache).__name__}.")
    if expand > 1:
        raise ValueError("`past_key_values` cannot be combined with beam search or num_return_sequences > 1.")
    if "sliding_attention" in (getattr(model.config, "layer_types", None) or ()):
        raise ValueError("`past_key_values` is not supported with sliding-window layers: their cache keeps only "
                         "the window, which generate() cannot continue from.")
    length = cache.get_seq_length()
    if length >= prompt_length:
        raise ValueError(f"`past_key_values` already holds {length} tokens but the prompt has {prompt_length}: pass "
                         "the whole prompt (the cached prefix and at least one new token) as input_ids.")
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.shape[0] != batch_size:
            raise ValueError(f"`past_key_values` holds {layer.keys.shape[0]} rows but the prompt has {batch_size}.")
    return length


def seed_cache(cache: Any, source: Any, length: int) -> None:
    """Copy the first `length` positions of every layer of `source` into `cache`."""
    positions = None
    for index, layer in enumerate(source.layers):
        if layer.keys is None:
            continue
        positions = torch.arange(length, device=layer.keys.device) if positions is None else positions
        cache.update(layer.keys[:, :, :length], layer.values[:, :, :length], index, {"cache_position": positions})


def extend_user_cache(target: Any, cache: Any, start: int) -> None:
    """Append to `target` the positions `cache` holds from `start` on (what generate() ran after the prefix)."""
    end = cache.get_seq_length()
    for index, layer in enumerate(cache.layers):
        positions = torch.arange(start, end, device=layer.keys.device)
        target.update(layer.keys[:, :, start:end], layer.values[:, :, start:end], index,
                      {"cache_position": positions})
