"""The batched sampler: each row's filters and penalties equal transformers' logits processors applied to that
row alone (the oracle), whatever the other rows ask; seeded rows draw from their own generator."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from qwen2 import SamplingParams
from qwen2.serving.sampler import _filter, _penalise, sample
from qwen2.serving.sequence import Sequence

VOCAB = 50


def _seq(params: SamplingParams, prompt=(1, 2, 3), output=(), seed=None) -> Sequence:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return Sequence(0, "r", 0, list(prompt) + list(output), len(prompt), params, 0, generator=generator)


ROWS = [
    (SamplingParams(top_k=5), lambda s: hf.TopKLogitsWarper(5)(None, s)),
    (SamplingParams(top_p=0.7), lambda s: hf.TopPLogitsWarper(0.7)(None, s)),
    (SamplingParams(min_p=0.1), lambda s: hf.MinPLogitsWarper(0.1)(None, s)),
    (SamplingParams(top_k=8, top_p=0.5), lambda s: hf.TopPLogitsWarper(0.5)(None, hf.TopKLogitsWarper(8)(None, s))),
    (SamplingParams(), lambda s: s),
]


def test_filters_match_transformers_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), VOCAB) * 3
    ours = _filter(logits, [p for p, _ in ROWS])
    for row, (_, reference) in enumerate(ROWS):
        theirs = reference(logits[row:row + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(theirs)), f"row {row}"
        kept = ~torch.isinf(theirs)
        assert torch.equal(ours[row][kept], logits[row][kept])


def test_repetition_penalty_matches_transformers_and_penalties_are_vllm_arithmetic():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    seqs = [
        _seq(SamplingParams(repetition_penalty=1.3), prompt=(4, 5), output=(6, 6, 7)),
        _seq(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt=(4, 5), output=(6, 6, 7)),
        _seq(SamplingParams()),
    ]
    ours = logits.clone()
    _penalise(ours, seqs)
    theirs = hf.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[4, 5, 6, 6, 7]]), logits[:1].clone())
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    expected = logits[1].clone()
    expected[6] -= 2 * 0.5 + 0.25  # output tokens only: the prompt's 4 and 5 are untouched
    expected[7] -= 0.5 + 0.25
    torch.testing.assert_close(ours[1], expected)
    assert torch.equal(ours[2], logits[2])


def test_seeded_rows_are_independent_of_their_neighbours():
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    alone = sample(logits[:1], [_seq(params, seed=3)], [set()]).tokens
    seqs = [_seq(params, seed=3), _seq(SamplingParams(temperature=1.5)), _seq(SamplingParams(temperature=0)),
            _seq(SamplingParams(top_k=3, seed=9), seed=9)]
    beside = sample(logits, seqs, [set()] * 4).tokens
    assert beside[0] == alone[0]
    assert beside[2] == int(logits[2].argmax())


def test_sampling_follows_the_distribution():
    """The exponential race draws from softmax(logits / T): frequencies over 4,000 draws match the
    probabilities (a chi-square bound that a wrong temperature or filter breaks by orders of magnitude)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=0.7, seed=0)
    seq = _seq(params, seed=0)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sample(logits, [seq], [set()]).tokens[0]] += 1
    expected = torch.softmax(logits[0] / 0.7, dim=-1) * 4000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.0  # 4 degrees of freedom: p < 0.001


def test_min_tokens_bans_stop_ids_and_logit_bias_is_added():
    logits = torch.zeros(2, VOCAB)
    logits[:, 2] = 10.0  # eos would win
    early = _seq(SamplingParams(temperature=0, min_tokens=2), output=(7,))
    late = _seq(SamplingParams(temperature=0, min_tokens=1, logit_bias={9: 100.0}), output=(7,))
    tokens = sample(logits, [early, late], [{2}, {2}]).tokens
    assert tokens[0] != 2 and tokens[1] == 9


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(4)
    logits = torch.randn(1, VOCAB)
    result = sample(logits, [_seq(SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0))], [set()])
    raw = torch.log_softmax(logits[0], dim=-1)
    entry = result.logprobs[0]
    chosen = result.tokens[0]
    assert entry[chosen].logprob == pytest.approx(float(raw[chosen]))
    assert entry[chosen].rank == int((raw > raw[chosen]).sum()) + 1
    top = raw.topk(3)
    for rank, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        assert entry[token].rank == rank and entry[token].logprob == pytest.approx(value)
