"""`output_hidden_states` / `output_attentions` of `generate(return_dict_in_generate=True)`, in transformers' layout.

transformers records them at each step: step 0 is the prompt (every prompt position), step t the token fed to
produce new token t, attending to all positions before it. Attention is causal, so one forward pass over the
finished sequence (without its last token, which no step fed) gives the same values; it runs once after decoding,
so the decode loop (compiled or not) stays as it is. Greedy and sampling only.
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def step_outputs(model: Any, plan: Any, sequences: torch.Tensor, hidden: bool,
                 attentions: bool) -> tuple[tuple | None, tuple | None]:
    """(hidden_states, attentions) per generated token, each a tuple over layers."""
    prompt_ids = plan.input_ids.shape[1]
    prompt = plan.prefill_length
    new_tokens = sequences.shape[1] - prompt_ids
    fed = sequences[:, prompt_ids:-1]  # the new tokens the decode steps fed back in
    embeds = plan.inputs_embeds if plan.inputs_embeds is not None else model.get_input_embeddings()(plan.input_ids)
    embeds = torch.cat([embeds, model.get_input_embeddings()(fed).to(embeds.dtype)], dim=1)
    mask = plan.attention_mask
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], fed.shape[1])], dim=1)
    positions = torch.cat([plan.position_ids, plan.position_ids[:, -1:] + torch.arange(1, fed.shape[1] + 1,
                                                                                        device=fed.device)], dim=1)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                output_hidden_states=hidden, output_attentions=attentions, logits_to_keep=1)
    bounds = [(plan.cached_length, prompt)] + [(prompt + t - 1, prompt + t) for t in range(1, new_tokens)]
    hidden_steps = None
    if hidden:
        hidden_steps = tuple(tuple(h[:, start:end] for h in out.hidden_states) for start, end in bounds)
    attention_steps = None
    if attentions:
        attention_steps = tuple(tuple(a[:, :, start:end, :end] for a in out.attentions) for start, end in bounds)
    return hidden_steps, attention_steps
