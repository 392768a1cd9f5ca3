"""Beam search (and beam sampling), vectorised over the batch, as transformers 5.x does it.

Same algorithm as `GenerationMixin._beam_search` in transformers 5.24 so the sequences agree: each step
keeps `beams_to_keep = max(2, 1 + n_eos) * num_beams` candidates, so that even if every top candidate ends
a hypothesis there are still `num_beams` live ones; finished hypotheses are scored with
`sum_logprobs / new_length ** length_penalty` and kept in a `num_beams`-wide pool per prompt; the search
stops when no live beam can beat the worst finished one (`early_stopping` semantics of the reference),
or at `max_length`. Shapes: B prompts, K beams, V vocabulary, T = max_length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from qwen2.generation.logits import apply_processors
from qwen2.generation.outputs import GenerateBeamDecoderOnlyOutput
from qwen2.generation.stopping import any_done

if TYPE_CHECKING:
    from qwen2.generation.generate import GenerationPlan

_DEAD = -1.0e9  # log-prob given to candidates that must not be picked


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pick beams along dim 1: tensor (B, K, ...), indices (B, K')."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def _fill_value(plan: GenerationPlan) -> int:
    """Token used for the unwritten tail of shorter hypotheses (the reference's choice, quirks included)."""
    if plan.eos_token_id is None:
        return -1
    if plan.pad_token_id is not None and int(plan.pad_token_id) != 0:
        return int(plan.pad_token_id)
    return int(plan.eos_token_id[0])


def beam_search(model: Any, plan: GenerationPlan) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
    config = plan.config
    device = plan.input_ids.device
    num_beams, max_length = config.num_beams, config.max_length
    length_penalty, early_stopping = config.length_penalty, config.early_stopping
    flat_batch, prompt_length = plan.input_ids.shape
    batch = flat_batch // num_beams
    n_eos = plan.eos_token_id.shape[0] if plan.eos_token_id is not None else 0
    keep = max(2, 1 + n_eos) * num_beams
    is_top_beam = torch.arange(keep, device=device) < num_beams  # (keep,)

    running = torch.full((batch, num_beams, max_length), _fill_value(plan), dtype=torch.long, device=device)
    running[:, :, :prompt_length] = plan.input_ids.view(batch, num_beams, prompt_length)
    finished = running.clone()  # the pool of finished hypotheses
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _DEAD  # all beams start identical: only the first may expand at step one
    finished_scores = torch.full((batch, num_beams), _DEAD, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    running_origin = torch.full((batch, num_beams, max_length - prompt_length), -1, dtype=torch.int32, device=device)
    finished_origin = running_origin.clone()

    record_scores = bool(config.return_dict_in_generate and config.output_scores)
    record_logits = bool(config.return_dict_in_generate and config.output_logits)
    all_scores: list[torch.Tensor] = []
    raw_logits: list[torch.Tensor] = []

    cache = model._make_cache(flat_batch, max_length)
    decode_step = model._decode_step_fn(config)
    logits = model._prefill(plan, cache)
    attention_mask = plan.attention_mask
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(flat_batch, max_length - prompt_length)], -1)
    position_ids = plan.position_ids[:, -1:] + 1
    cache_position = torch.tensor([prompt_length], device=device)
    cur_len = prompt_length
    batch_offset = torch.arange(batch, device=device).view(-1, 1) * num_beams

    while True:
        flat_running = running[:, :, :cur_len].reshape(flat_batch, cur_len)
        log_probs = apply_processors(plan.processors, flat_running, torch.log_softmax(logits, dim=-1))
        if record_logits:
            raw_logits.append(logits.clone())
        if record_scores:
            all_scores.append(log_probs.clone())
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)  # (B, K*V)

        # 1. the `keep` best continuations of all beams
        if config.do_sample:
            picked = torch.multinomial(torch.softmax(totals, dim=-1), keep, generator=plan.generator)
            cand_scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
            picked = picked.gather(1, order)
        else:
            cand_scores, picked = torch.topk(totals, keep)
        source_beam = picked // vocab  # (B, keep)
        cand_sequences = _gather(running, source_beam)
        cand_sequences[:, :, cur_len] = picked % vocab
        cand_origin = _gather(running_origin, source_beam)
        cand_origin[:, :, cur_len - prompt_length] = (source_beam + batch_offset).to(cand_origin.dtype)
        hits = any_done(plan.criteria, cand_sequences[:, :, : cur_len + 1].reshape(batch * keep, -1), None)
        hits = hits.view(batch, keep)

        # 2. the next live beams: the best candidates that did not just stop
        live_scores = cand_scores + hits.float() * _DEAD
        best_live = torch.topk(live_scores, num_beams)[1]
        running = _gather(cand_sequences, best_live)
        running_scores = _gather(live_scores, best_live)
        running_origin = _gather(cand_origin, best_live)

        # 3. candidates that stopped join the finished pool, length-normalised
        just_finished = hits & is_top_beam[None, :]
        normalised = cand_scores / ((cur_len + 1 - prompt_length) ** length_penalty)
        pool_full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        normalised = normalised + pool_full.float() * _DEAD
        normalised = normalised + (~improvable).float() * _DEAD
        normalised = normalised + (~just_finished).float() * _DEAD
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = torch.topk(merged_scores, num_beams)[1]
        finished = _gather(torch.cat([finished, cand_sequences], dim=1), best)
        finished_scores = _gather(merged_scores, best)
        finished_origin = _gather(torch.cat([finished_origin, cand_origin], dim=1), best)
        is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), best)

        cur_len += 1
        # 4. can a live beam still beat the worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - prompt_length
        else:
            best_length = cur_len - prompt_length
        best_possible = running_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], _DEAD)
        improvable = improvable & (best_possible > worst_finished).any(dim=-1, keepdim=True)
        go_on = improvable.any() & ~(is_finished.all() & (early_stopping is True)) & ~hits.all()
        if not bool(go_on):
            break

        # 5. feed the live beams' last tokens, with the cache rows rearranged to follow their beams
        cache.reorder_cache(running_origin[..., cur_len - 1 - prompt_length].reshape(-1).long())
        tokens = running[:, :, cur_len - 1].reshape(flat_batch, 1)
        logits = decode_step(tokens, position_ids, cache_position, attention_mask, cache)
        position_ids = position_ids + 1
        cache_position = cache_position + 1

    returned = config.num_return_sequences
    sequences = finished[:, :returned].reshape(batch * returned, -1)
    sequence_scores = finished_scores[:, :returned].reshape(-1)
    origins = finished_origin[:, :returned].reshape(batch * returned, -1)
    generated = int((origins + 1).bool().sum(dim=1).max())
    sequences = sequences[:, : prompt_length + generated]
    if not config.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=sequence_scores if config.output_scores else None,
        scores=tuple(all_scores) if record_scores else None,
        logits=tuple(raw_logits) if record_logits else None,
        beam_indices=origins[:, :generated],
        cache=cache,
    )
