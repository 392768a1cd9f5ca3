"""Per-request sampling applied to a batch of rows at once.

Order (vLLM's): logprobs are taken from the raw logits; then min_tokens bans the stop tokens, logit_bias is
added, the repetition/frequency/presence penalties applied; greedy rows take the argmax of that; the others
are divided by their temperature, filtered by min-p, top-k and top-p, and sampled. Every step is one tensor
operation over the rows that need it; only drawing the noise of a seeded row uses that row's own generator
(an exponential race, `argmax(p / Exp(1))`, is a draw from p), which is what keeps a seeded request's samples
the same whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qwen2.serving.outputs import Logprob
from qwen2.serving.sequence import Sequence


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per row, None if the row did not ask


def sample(logits: Tensor, seqs: list[Sequence], stop_ids: list[set[int]]) -> SampleResult:
    """One token per row of `logits` (B, V) float32 for `seqs`; `stop_ids` are each row's stop/eos ids (banned
    while the row has fewer than min_tokens)."""
    rows = logits.shape[0]
    device = logits.device
    params = [s.params for s in seqs]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    if any(_changes_logits(seq, ids) for seq, ids in zip(seqs, stop_ids)):
        logits = logits.clone()  # the caller's logits stay raw; the clone (B x V float32) only when written
        _ban_stops(logits, seqs, stop_ids)
        _add_bias(logits, params)
        _penalise(logits, seqs)
    greedy = torch.tensor([p.greedy for p in params], device=device)
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        sampled = _sample_rows(logits, seqs)
        tokens = torch.where(greedy, tokens, sampled)
    token_list = tokens.tolist()
    logprobs: list[dict[int, Logprob] | None] = [None] * rows
    if raw_logprobs is not None:
        logprobs = _logprob_entries(raw_logprobs, tokens, [p.logprobs for p in params])
    return SampleResult(token_list, logprobs)


def _changes_logits(seq: Sequence, stop_ids: set[int]) -> bool:
    """Whether `_ban_stops`, `_add_bias` or `_penalise` write this row."""
    p = seq.params
    return bool((stop_ids and seq.num_output_tokens < p.min_tokens) or p.logit_bias or p.repetition_penalty != 1.0
                or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)


def _ban_stops(logits: Tensor, seqs: list[Sequence], stop_ids: list[set[int]]) -> None:
    """min_tokens: no stop token before then, unless nothing else is allowed (a structured output whose grammar
    is complete ends rather than be forced into a token outside it)."""
    for row, (seq, ids) in enumerate(zip(seqs, stop_ids)):
        if ids and seq.num_output_tokens < seq.params.min_tokens:
            banned = logits[row].index_fill(0, torch.tensor(sorted(ids), device=logits.device), float("-inf"))
            if seq.constraint is None or bool(banned.isfinite().any()):
                logits[row] = banned


def _add_bias(logits: Tensor, params: list) -> None:
    vocab = logits.shape[1]
    for row, p in enumerate(params):
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab]
            if ids:
                logits[row, ids] += torch.tensor([p.logit_bias[t] for t in ids], device=logits.device)


def _penalise(logits: Tensor, seqs: list[Sequence]) -> None:
    """Repetition penalty over prompt and output tokens (a positive logit divided, a negative one multiplied);
    frequency and presence penalties over output tokens (subtracted per occurrence / once)."""
    params = [s.params for s in seqs]
    repetition = [p.repetition_penalty != 1.0 for p in params]
    additive = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    if not any(repetition) and not any(additive):
        return
    rows, vocab = logits.shape
    device = logits.device
    counts = torch.zeros(rows, vocab, device=device)
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
    for row, seq in enumerate(seqs):
        if additive[row] or repetition[row]:
            output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
            counts[row].index_add_(0, output, torch.ones(len(output), device=device))
        if repetition[row]:
            seen[row, torch.tensor(seq.token_ids[:seq.num_prompt_tokens], dtype=torch.long, device=device)] = True
    seen |= counts > 0
    penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits.copy_(torch.where(seen, penalised, logits))
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    logits -= frequency * counts + presence * (counts > 0).float()


def _sample_rows(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    params = [s.params for s in seqs]
    device = logits.device
    temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)[:, None]
    logits = logits / temperature
    logits = _filter(logits, params)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs)
    unseeded = [row for row, seq in enumerate(seqs) if seq.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_()
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            noise[row].exponential_(generator=seq.generator)
    return (probs / noise).argmax(dim=-1)


def _filter(logits: Tensor, params: list) -> Tensor:
    """min-p, then top-k, then top-p, each only if some row uses it; filtered tokens get -inf."""
    device = logits.device
    vocab = logits.shape[1]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    use_k = any(0 < p.top_k < vocab for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if not (use_k or use_p):
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(ordered, dtype=torch.bool)
    if use_k:
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)[:, None]
        remove |= torch.arange(vocab, device=device)[None, :] >= top_k
        ordered = ordered.masked_fill(remove, float("-inf"))
    if use_p:
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        remove |= before > top_p
        remove[:, 0] = False
    return logits.scatter(1, order, ordered.masked_fill(remove, float("-inf")))


def _logprob_entries(raw: Tensor, tokens: Tensor, ks: list[int | None]) -> list[dict[int, Logprob] | None]:
    """Per row with a k: the chosen token's logprob and rank, plus the top-k tokens'; None for rows without."""
    chosen = raw.gather(1, tokens[:, None])  # (B, 1)
    ranks = ((raw > chosen).sum(dim=-1) + 1).tolist()
    widest = max((k or 0) for k in ks)
    top_values, top_ids = raw.topk(widest, dim=-1) if widest else (None, None)
    chosen_list = chosen[:, 0].tolist()
    token_list = tokens.tolist()
    out: list[dict[int, Logprob] | None] = []
    for row, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        token = token_list[row]
        entry = {token: Logprob(token, chosen_list[row], ranks[row])}
        if k:
            for rank, (value, other) in enumerate(zip(top_values[row, :k].tolist(), top_ids[row, :k].tolist()),
                                                  start=1):
                entry.setdefault(other, Logprob(other, value, rank))
        out.append(entry)
    return out


def prompt_logprobs(logits: Tensor, next_tokens: list[int], k: int) -> list[dict[int, Logprob] | None]:
    """Logprobs of each next prompt token given the positions before it (and the top-k there)."""
    targets = torch.tensor(next_tokens, dtype=torch.long, device=logits.device)
    return _logprob_entries(torch.log_softmax(logits, dim=-1), targets, [k] * len(next_tokens))
