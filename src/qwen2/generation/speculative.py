"""Speculative decoding for generate(): `prompt_lookup_num_tokens=` and `assistant_model=` (transformers' arguments).

A drafter (qwen2.generation.draft) proposes D tokens; the model verifies them in ONE forward over the last token
and the draft (positions n-1 .. n-1+D of its static cache), so one pass over the weights can yield up to D + 1
tokens. Each position's logits go through the same processors as plain decoding, with the prefix that position
would have. Acceptance (Leviathan et al. 2023, Chen et al. 2023):
- greedy: a draft token is kept while it equals the argmax; the first mismatch is replaced by the argmax, so the
  tokens are plain greedy's. Compiled, each verification row is computed as the compiled one-row step computes
  it (qwen2.generation.speculative_verify), so the logits are the same bits; eager, a several-row forward may
  round differently from the one-row step and flip a near-tie.
- sampling: draft token x drawn from q is kept with probability min(1, p(x)/q(x)); on rejection the token is drawn
  from norm(max(0, p - q)); after a fully accepted draft one more token comes from p. Prompt lookup's q is
  one-hot, where this is "draw from p, keep the draft while the draw equals it". The output distribution is p's.
Past the first rejection the cache is cropped back (its later slots are masked, then overwritten), so afterwards it
holds what a plain run's holds. Stopping criteria are checked token by token, as the plain loop does.

When it pays (`SpeculationControl`): where the lookup finds nothing, the token comes from the plain decode step
(no verification). Eager, the draft length adapts to the acceptance (grows by 2 after a fully accepted draft,
shrinks by 1 otherwise; `num_assistant_tokens_schedule="constant"` keeps an assistant's fixed); compiled, the
verification's rows are padded to a fixed 8, so a shorter draft would cost the same and the draft stays at up to
7 tokens. Where the acceptance does not pay for the verification's extra cost, speculation pauses for a number of
plain steps that doubles while it keeps not paying. Batches of more than one row decode plainly (their rows
would accept different lengths; on a CPU the batch already fills the weight pass).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen2.generation.draft import AssistantDrafter, PromptLookupDrafter
from qwen2.generation.fast import _with_decode_linears
from qwen2.generation.logits import apply_processors
from qwen2.generation.prompt import extend_user_cache, seed_cache
from qwen2.generation.speculative_verify import Verifier
from qwen2.generation.stopping import any_done

logger = logging.getLogger(__name__)

_DEFAULT_NUM_ASSISTANT_TOKENS = 20  # transformers' defaults
_DEFAULT_CONFIDENCE = 0.4
_DEFAULT_MAX_NGRAM = 2
_SCHEDULES = ("constant", "heuristic", "heuristic_transient")
_MAX_PAUSE = 64
# What a verification of D draft tokens costs beyond a plain decode step, in plain steps: (fixed, per draft
# token), by whether the steps are compiled. Eager, measured on the default model, int8, 2 cores: forwards of
# 1 / 8 / 16 tokens took 51 / 82 / 120 ms. Compiled, the rows are padded to 8 (the cost does not depend on D):
# a verification took 48.6 ms against the compiled step's 22.2 ms (medians, same run).
VERIFY_COST = {False: (0.0, 0.085), True: (1.2, 0.0)}


@dataclass
class SpeculationStats:
    """What the latest speculative generate() call did (`last_speculation_stats()`; the benchmark reads it)."""

    verify_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    plain_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class SpeculationControl:
    """Draft length, and the switch that turns speculation off where its acceptance does not pay.

    A verification of D draft tokens costs about `1 + fixed + per_token * D` plain steps (`VERIFY_COST`) and
    yields `1 + accepted` tokens, so it gains `accepted - fixed - per_token * D` steps. A moving average of that
    gain below zero pauses speculation for a number of plain steps that doubles while it keeps not paying. The
    rule reads counts, not clocks, so a call's tokens and its draft decisions are reproducible."""

    maximum: int
    adaptive: bool = True
    compiled_plain_step: bool = False
    length: int = 0
    pause: int = 0  # plain steps left before speculating again
    _next_pause: int = 4
    _gain: float = 0.0
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def __post_init__(self) -> None:
        self.length = self.maximum

    def draft_length(self) -> int:
        if self.pause > 0:
            self.pause -= 1
            return 0
        return self.length

    def plain_step(self) -> None:
        self.stats.plain_steps += 1

    def verified(self, drafted: int, accepted: int) -> None:
        self.stats.verify_steps += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        if self.adaptive:
            self.length = min(self.maximum, self.length + 2) if accepted == drafted else max(1, self.length - 1)
        fixed, per_token = VERIFY_COST[self.compiled_plain_step]
        self._gain = 0.7 * self._gain + 0.3 * (accepted - fixed - per_token * drafted)
        if self._gain < 0:
            self.pause, self._next_pause = self._next_pause, min(2 * self._next_pause, _MAX_PAUSE)
            self._gain = 0.0
        elif accepted:
            self._next_pause = 4


_last_stats = SpeculationStats()


def last_speculation_stats() -> SpeculationStats:
    """Counts of the latest speculative generate() call in this process (acceptance rate, verification steps)."""
    return _last_stats


def check_speculation(model: Any, config: Any, assistant: Any, batch_size: int) -> bool:
    """Whether this call speculates; refuses combinations that cannot work with a clear error."""
    lookup = config.prompt_lookup_num_tokens
    if lookup is None and assistant is None:
        return False
    if lookup is not None and assistant is not None:
        raise ValueError("Pass either `prompt_lookup_num_tokens` or `assistant_model`, not both.")
    if lookup is not None and (not isinstance(lookup, int) or isinstance(lookup, bool) or lookup < 1):
        raise ValueError(f"`prompt_lookup_num_tokens` must be a positive integer, got {lookup!r}.")
    ngram = config.max_matching_ngram_size
    if ngram is not None and (not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 1):
        raise ValueError(f"`max_matching_ngram_size` must be a positive integer, got {ngram!r}.")
    if config.num_beams > 1:
        raise ValueError("Speculative decoding (`prompt_lookup_num_tokens` / `assistant_model`) does not work with "
                         f"beam search (num_beams={config.num_beams}); set `num_beams=1`.")
    if assistant is not None:
        _check_assistant(model, assistant, config)
    if any(layer_type == "sliding_attention" for layer_type in getattr(model.config, "layer_types", None) or ()) \
            and getattr(model.config, "use_sliding_window", False):
        logger.info("Speculative decoding is off for a model with sliding-window layers (their ring buffers cannot "
                    "be rolled back); decoding plainly.")
        return False
    if batch_size > 1:
        logger.info("Speculative decoding works on one sequence; decoding the batch of %d rows plainly.", batch_size)
        return False
    return True


def _check_assistant(model: Any, assistant: Any, config: Any) -> None:
    if not hasattr(assistant, "config") or not callable(assistant):
        raise ValueError(f"`assistant_model` must be a causal LM (a qwen2 model), got {type(assistant).__name__}.")
    ours, theirs = model.config.vocab_size, getattr(assistant.config, "vocab_size", None)
    if ours != theirs:
        raise ValueError(f"`assistant_model` has a vocabulary of {theirs} tokens and the model {ours}: the assistant "
                         "must share the model's tokenizer and vocabulary size.")
    schedule = config.num_assistant_tokens_schedule
    if schedule is not None and schedule not in _SCHEDULES:
        raise ValueError(f"`num_assistant_tokens_schedule` must be one of {_SCHEDULES}, got {schedule!r}.")
    count = config.num_assistant_tokens
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ValueError(f"`num_assistant_tokens` must be a positive integer, got {count!r}.")
    model_device = next(model.parameters()).device
    if next(assistant.parameters()).device != model_device:
        raise ValueError(f"`assistant_model` is on {next(assistant.parameters()).device} and the model on "
                         f"{model_device}; move them to the same device.")


def _drafter_and_control(plan: Any, assistant: Any, max_draft: int | None) -> tuple[Any, SpeculationControl]:
    """max_draft: the compiled verification's longest draft (its rows are padded: a shorter draft costs the
    same, so the length stays at its maximum), None when verifying eagerly."""
    config = plan.config
    compiled = max_draft is not None
    if assistant is None:
        drafter = PromptLookupDrafter(config.max_matching_ngram_size or _DEFAULT_MAX_NGRAM, plan.eos_token_id)
        length, adaptive = config.prompt_lookup_num_tokens, not compiled
    else:
        threshold = config.assistant_confidence_threshold
        drafter = AssistantDrafter(assistant, config.max_length, plan.processors, bool(config.do_sample),
                                   plan.generator, _DEFAULT_CONFIDENCE if threshold is None else threshold)
        length = config.num_assistant_tokens or _DEFAULT_NUM_ASSISTANT_TOKENS
        adaptive = (config.num_assistant_tokens_schedule or "constant") != "constant"
    return drafter, SpeculationControl(min(length, max_draft or length), adaptive, compiled)


def speculative_steps(model: Any, plan: Any, assistant: Any = None) -> Iterator[Any]:
    """The speculative counterpart of `GenerationMixin._decode_steps` (one row): yields one DecodeStep per token."""
    from qwen2.generation.generate import DecodeStep

    config = plan.config
    ids = plan.input_ids[0]  # (n,) every token so far
    prompt_length = plan.prefill_length
    cache = model._make_cache(1, config.max_length + prompt_length - plan.input_ids.shape[1])
    decode_step = model._decode_step_fn(config)
    if plan.user_cache is not None:
        seed_cache(cache, plan.user_cache, plan.cached_length)
    compiled = getattr(decode_step, "func", None) is not _with_decode_linears
    verify = Verifier(model, compiled)
    drafter, control = _drafter_and_control(plan, assistant, verify.max_draft)
    global _last_stats
    _last_stats = control.stats
    if plan.inputs_embeds is not None and isinstance(drafter, AssistantDrafter):
        raise ValueError("`assistant_model` needs the prompt as token ids, not `inputs_embeds`.")
    logits = model._prefill(plan, cache)[0]  # (V,) predicting the token at position `offset + len(ids)`
    offset = prompt_length - plan.input_ids.shape[1]  # embeddings-only prompts: their positions come first
    mask = plan.attention_mask  # a left-padded single row: cover every cache slot, as the plain loop does
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(1, cache.get_max_cache_shape() - prompt_length)], dim=-1)
    position_shift = int(plan.position_ids[0, -1]) + 1 - prompt_length  # left padding of a single row: 0

    def emit(token: torch.Tensor, scores: torch.Tensor, raw: torch.Tensor) -> tuple[Any, bool]:
        nonlocal ids
        ids = torch.cat([ids, token.reshape(1)])
        done = bool(any_done(plan.criteria, ids[None], scores[None])[0])
        return DecodeStep(tokens=token.reshape(1), scores=scores[None], logits=raw[None], cache=cache), done

    scores = apply_processors(plan.processors, ids[None], logits[None])[0]
    step, done = emit(_pick(config, scores, plan.generator), scores, logits)
    yield step
    while not done:
        position = offset + ids.shape[0] - 1  # of the last token, not yet in the cache
        room = min(config.max_length - ids.shape[0] - 1,  # the verification adds one token beyond the draft
                   verify.room(position, cache))
        want = min(control.draft_length(), room)
        draft, q = drafter.propose(ids, want) if want > 0 else (ids[:0], None)
        if draft.numel() == 0:
            logits = decode_step(ids[-1:][None], torch.tensor([[position + position_shift]], device=ids.device),
                                 torch.tensor([position], device=ids.device), mask, cache)[0]
            scores = apply_processors(plan.processors, ids[None], logits[None])[0]
            step, done = emit(_pick(config, scores, plan.generator), scores, logits)
            control.plain_step()
            yield step
            continue
        all_logits = verify(torch.cat([ids[-1:], draft]), position, position_shift, mask, cache)  # (D + 1, V)
        accepted, steps = _accept(plan, config, ids, draft, q, all_logits)
        for token, scores, raw in steps:
            step, done = emit(token, scores, raw)
            yield step
            if done:
                break
        # Positions past the last kept token's predecessor are dropped (masked until overwritten).
        cache.crop(offset + ids.shape[0] - 1)
        drafter.rollback(ids.shape[0] - 1)
        control.verified(draft.numel(), accepted)
    if plan.user_cache is not None:
        extend_user_cache(plan.user_cache, cache, plan.cached_length)


def _accept(plan: Any, config: Any, ids: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None,
            logits: torch.Tensor) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The tokens the verification yields: accepted draft tokens, then one corrected or bonus token.
    Returns (accepted draft count, [(token, processed scores, raw logits)])."""
    steps = []
    for i in range(draft.shape[0] + 1):
        prefix = torch.cat([ids, draft[:i]])
        scores = apply_processors(plan.processors, prefix[None], logits[i][None])[0]
        if i == draft.shape[0]:  # every draft token accepted: one more from the model
            token = _pick(config, scores, plan.generator)
            steps.append((token, scores, logits[i]))
            return i, steps
        token, kept = _verify(config, scores, draft[i], None if q is None else q[i], plan.generator)
        steps.append((token, scores, logits[i]))
        if not kept:
            return i, steps
    raise AssertionError("unreachable")


def _pick(config: Any, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if config.do_sample:
        return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[0]
    return scores.argmax(-1)


def _verify(config: Any, scores: torch.Tensor, proposed: torch.Tensor, q: torch.Tensor | None,
            generator: torch.Generator | None) -> tuple[torch.Tensor, bool]:
    """(the token at this position, whether it is the proposed one) by the acceptance rule."""
    if not config.do_sample or q is None:
        # Greedy, or a one-hot draft when sampling: draw from p and keep the draft iff the draw equals it.
        token = _pick(config, scores, generator)
        return token, bool(token == proposed)
    p = torch.softmax(scores, -1)
    ratio = p[proposed] / q[proposed]
    if float(torch.rand((), generator=generator, device=scores.device)) < float(ratio):
        return proposed, True
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    if not float(total) > 0:  # p == q: any rejection is measure-zero; draw from p
        residual, total = p, p.sum()
    return torch.multinomial(residual / total, 1, generator=generator)[0], False
