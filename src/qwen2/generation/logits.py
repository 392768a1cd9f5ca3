"""Logits processors: small callables `(input_ids, scores) -> scores`, composed in the reference's order.

Semantics follow transformers' `generation/logits_process.py` (5.24) exactly, so that greedy, sampling
and beam search pick the same tokens; `build_logits_processors` mirrors the order of
`GenerationMixin._get_logits_processor`. All of them are pure tensor code with no host sync, so the
decode loop can keep the device busy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from qwen2.generation.bias import (ExponentialDecayLengthPenalty, PrefixAllowedTokens, SequenceBias, bad_words,
                                   sequence_bias_dict)
from qwen2.generation.config import GenerationConfig

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = -math.inf


def _token_mask(token_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(V,) bool mask of `token_ids` over the vocabulary of `scores`; ids outside it are ignored.

    Scattered into a zero mask: `torch.isin` over the vocabulary costs ~0.7 ms per decode step on a CPU.
    """
    vocab_size = scores.shape[-1]
    ids = token_ids.to(scores.device).reshape(-1)
    ids = torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)  # out of range: the spare slot
    mask = torch.zeros(vocab_size + 1, dtype=torch.bool, device=scores.device)
    return mask.index_fill_(0, ids, True)[:vocab_size]


class RepetitionPenalty:
    """Divide positive / multiply negative logits of tokens already in the sequence (CTRL's penalty).

    `prompt_ignore_length` (per row) hides the left padding, so pad tokens are not penalised.
    """

    def __init__(self, penalty: float, prompt_ignore_length: torch.Tensor | int | None = None) -> None:
        if not isinstance(penalty, float) or not penalty > 0:
            raise ValueError(f"`repetition_penalty` has to be a strictly positive float, but is {penalty!r}.")
        self.penalty = penalty
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab_size = scores.shape[-1]
        if isinstance(self.prompt_ignore_length, int):
            input_ids = input_ids[:, self.prompt_ignore_length :]
        elif isinstance(self.prompt_ignore_length, torch.Tensor):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            hidden = positions[None, :] < self.prompt_ignore_length.to(input_ids.device)[:, None]
            input_ids = input_ids.masked_fill(hidden, vocab_size)  # index V lands in the padding column below
        input_ids = input_ids.clamp(max=vocab_size)
        padded = torch.nn.functional.pad(scores, (0, 1))  # (B, V + 1)
        seen = padded.gather(1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return padded.scatter(1, input_ids, seen)[..., :vocab_size]


class NoRepeatNGram:
    """Ban any token that would complete an n-gram already present in the row."""

    def __init__(self, ngram_size: int) -> None:
        if not isinstance(ngram_size, int) or ngram_size <= 0:
            raise ValueError(f"`no_repeat_ngram_size` has to be a strictly positive integer, but is {ngram_size!r}.")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, length = self.ngram_size, input_ids.shape[-1]
        if length < n:
            return scores
        prefix = input_ids[:, length + 1 - n :]  # (B, n - 1): the n-gram being started now
        windows = input_ids.unfold(1, n, 1)  # (B, W, n)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (B, W)
        vocab_size = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], vocab_size + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size), True)
        return scores.masked_fill(banned[:, :vocab_size], NEG_INF)


class MinLength:
    """Forbid end-of-sequence tokens until the row holds `min_length` tokens (prompt included)."""

    def __init__(self, min_length: int, eos_token_id: torch.Tensor, prompt_length: int = 0) -> None:
        if not isinstance(min_length, int) or min_length < 0:
            raise ValueError(f"`min_length`/`min_new_tokens` has to be a non-negative integer, but is {min_length!r}.")
        self.min_length = min_length
        self.eos_token_id = eos_token_id
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_length < self.min_length:
            return scores.masked_fill(_token_mask(self.eos_token_id, scores), NEG_INF)
        return scores


class ForceTokenAt:
    """Force `token_ids` (all other logits -inf) when the row is exactly `length` tokens long."""

    def __init__(self, length: int, token_ids: torch.Tensor) -> None:
        self.length = length
        self.token_ids = token_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.length:
            return scores
        forced = torch.full_like(scores, NEG_INF)
        forced[:, self.token_ids.to(scores.device)] = 0
        return forced


class SuppressTokens:
    """Set the logits of `token_ids` to -inf, always or only when the row is `at_length` tokens long."""

    def __init__(self, token_ids: Sequence[int], at_length: int | None = None) -> None:
        self.token_ids = torch.tensor(list(token_ids), dtype=torch.long)
        self.at_length = at_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at_length is not None and input_ids.shape[-1] != self.at_length:
            return scores
        return scores.masked_fill(_token_mask(self.token_ids, scores), NEG_INF)


def remove_invalid_values(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """NaN -> 0 and ±inf -> the dtype's extremes, so sampling never sees invalid probabilities."""
    finfo = torch.finfo(scores.dtype)
    return torch.nan_to_num(scores, nan=0.0, posinf=finfo.max, neginf=finfo.min)


def renormalize(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Log-softmax: scores become log-probabilities again after the warpers cut tokens."""
    return scores.log_softmax(dim=-1)


class Temperature:
    def __init__(self, temperature: float) -> None:
        if not isinstance(temperature, float) or not temperature > 0:
            hint = " For greedy decoding set `do_sample=False` instead." if temperature == 0 else ""
            raise ValueError(f"`temperature` (={temperature!r}) has to be a strictly positive float.{hint}")
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k highest logits (ties with the k-th are kept too)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1) -> None:
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k!r}.")
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(scores < kth, NEG_INF)


class TopP:
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to more than top_p."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1) -> None:
        top_p = float(top_p)
        if not 0 <= top_p <= 1.0:
            raise ValueError(f"`top_p` has to be a float in [0, 1], but is {top_p!r}.")
        self.top_p = top_p
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self.top_p)
        remove[..., -self.min_tokens_to_keep :] = False
        return scores.masked_fill(remove.scatter(1, sorted_indices, remove), NEG_INF)


class MinP:
    """Drop tokens whose probability is below min_p times the top token's probability."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1) -> None:
        if not 0 <= min_p <= 1.0:
            raise ValueError(f"`min_p` has to be a float in the [0, 1] interval, but is {min_p!r}.")
        self.min_p = min_p
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        remove.scatter_(-1, keep, False)
        return scores.masked_fill(remove, NEG_INF)


class TypicalP:
    """Locally typical sampling: keep tokens whose surprisal is closest to the entropy, up to `mass`."""

    def __init__(self, mass: float, min_tokens_to_keep: int = 1) -> None:
        mass = float(mass)
        if not 0 < mass < 1:
            raise ValueError(f"`typical_p` has to be a float > 0 and < 1, but is {mass!r}.")
        self.mass = mass
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_probs = scores.log_softmax(dim=-1)
        entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
        shifted = (-log_probs - entropy).abs()
        sorted_shifted, sorted_indices = torch.sort(shifted, descending=False)
        cumulative = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.mass).sum(dim=1).clamp_(max=sorted_shifted.shape[-1] - 1)
        remove = sorted_shifted > sorted_shifted.gather(1, last.view(-1, 1))
        remove[..., : self.min_tokens_to_keep] = False
        return scores.masked_fill(remove.scatter(1, sorted_indices, remove), NEG_INF)


class EpsilonCutoff:
    """Drop tokens with probability below epsilon (or, for eta sampling, an entropy-dependent bound)."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1, eta: bool = False) -> None:
        epsilon = float(epsilon)
        name = "eta_cutoff" if eta else "epsilon_cutoff"
        if not 0 < epsilon < 1:
            raise ValueError(f"`{name}` has to be a float > 0 and < 1, but is {epsilon!r}.")
        self.epsilon = torch.tensor(epsilon)
        self.min_tokens_to_keep = min_tokens_to_keep
        self.eta = eta

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        bound = self.epsilon.to(scores.device)
        if self.eta:
            entropy = torch.distributions.Categorical(logits=scores).entropy()
            bound = torch.min(bound, bound.sqrt() * torch.exp(-entropy))[..., None]
        remove = probs < bound
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove &= scores < torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(remove, NEG_INF)


# Fields that change decoding but that this implementation does not provide: refuse rather than ignore.
_UNSUPPORTED = {
    "top_h": None,
    "watermarking_config": None,
    "constraints": None,
    "force_words_ids": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "token_healing": (None, False),
    "guidance_scale": (None, 1, 1.0),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0, 0.0),
    "assistant_early_exit": None,
    "use_mtp": (None, False),
    "encoder_repetition_penalty": (None, 1, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    # generate() always decodes on its preallocated cache ("static"); "dynamic" gives the same tokens. Offloaded
    # or quantised caches are not implemented.
    "cache_implementation": (None, "static", "dynamic"),
}


def check_supported(config: GenerationConfig) -> None:
    """Raise a ValueError naming any set field that qwen2's generate() does not implement."""
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(config, name, None)
        allowed = neutral if isinstance(neutral, tuple) else (neutral,)
        if value not in allowed:
            raise ValueError(f"`{name}={value!r}` is not supported by qwen2's generate(); unset it.")


def build_logits_processors(
    config: GenerationConfig,
    prompt_length: int,
    eos_token_id: torch.Tensor | None,
    padding_lengths: torch.Tensor | None = None,
    custom: Sequence[LogitsProcessor] = (),
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], Sequence[int]] | None = None,
) -> list[LogitsProcessor]:
    """The processors `config` asks for, in transformers' order; custom ones go before the sampling warpers."""
    processors: list[LogitsProcessor] = []
    if config.sequence_bias is not None:
        processors.append(SequenceBias(sequence_bias_dict(config.sequence_bias)))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(config.repetition_penalty, padding_lengths))
    if config.no_repeat_ngram_size is not None and config.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        processors.append(bad_words(config.bad_words_ids, eos_token_id))
    if eos_token_id is not None and config.min_length is not None and config.min_length > 0:
        processors.append(MinLength(config.min_length, eos_token_id))
    if eos_token_id is not None and config.min_new_tokens is not None and config.min_new_tokens > 0:
        processors.append(MinLength(config.min_new_tokens, eos_token_id, prompt_length=prompt_length))
    if prefix_allowed_tokens_fn is not None:
        rows_per_prompt = max(config.num_beams or 1, config.num_return_sequences or 1)
        processors.append(PrefixAllowedTokens(prefix_allowed_tokens_fn, rows_per_prompt))
    if config.forced_bos_token_id is not None:
        processors.append(ForceTokenAt(1, torch.tensor(config.forced_bos_token_id)))
    if config.forced_eos_token_id is not None:
        processors.append(ForceTokenAt(config.max_length - 1, torch.tensor(config.forced_eos_token_id).reshape(-1)))
    if config.remove_invalid_values is True:
        processors.append(remove_invalid_values)
    if config.exponential_decay_length_penalty is not None:
        processors.append(ExponentialDecayLengthPenalty(config.exponential_decay_length_penalty, eos_token_id,
                                                        prompt_length))
    if config.suppress_tokens is not None:
        processors.append(SuppressTokens(config.suppress_tokens))
    if config.begin_suppress_tokens is not None:
        begin = prompt_length if (prompt_length > 1 or config.forced_bos_token_id is None) else prompt_length + 1
        processors.append(SuppressTokens(config.begin_suppress_tokens, at_length=begin))
    processors.extend(custom)
    if config.do_sample:
        processors.extend(build_warpers(config, eos_token_id))
    if config.renormalize_logits is True:
        processors.append(renormalize)
    return processors


def build_warpers(config: GenerationConfig, eos_token_id: torch.Tensor | None) -> list[LogitsProcessor]:
    """Sampling-only processors. Beam sampling keeps one non-eos candidate beyond the eos tokens."""
    keep = 1
    if config.num_beams is not None and config.num_beams > 1:
        keep = (eos_token_id.shape[0] if eos_token_id is not None else 1) + 1
    warpers: list[LogitsProcessor] = []
    if config.top_p is not None and not 0 <= config.top_p <= 1:  # the reference skips (not refuses) top_p > 1
        raise ValueError(f"`top_p` has to be a float in [0, 1], but is {config.top_p!r}.")
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(Temperature(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopK(config.top_k, keep))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopP(config.top_p, keep))
    if config.min_p is not None:
        warpers.append(MinP(config.min_p, keep))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalP(config.typical_p, keep))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonCutoff(config.epsilon_cutoff, keep))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EpsilonCutoff(config.eta_cutoff, keep, eta=True))
    return warpers


def apply_processors(processors: Sequence[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores
