"""Scheduler invariants on random arrival traces (hypothesis): no block held by two sequences unless it is the
same cached prefix block, reference counts equal the holders, the token budget and max_num_seqs hold, FIFO
within a priority, and every request finishes with the pool whole again. The model is replaced by a fake
step: each sequence that completes its tokens gets one new token."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2 import SamplingParams
from qwen2.serving.block_pool import BlockPool
from qwen2.serving.scheduler import Scheduler
from qwen2.serving.sequence import Sequence, SequenceStatus

BLOCK = 4

requests = st.lists(
    st.tuples(
        st.integers(0, 6),  # arrival step
        st.integers(1, 30),  # prompt length
        st.integers(1, 12),  # new tokens
        st.integers(0, 1),  # priority
        st.integers(0, 3),  # prompt family: shared prefixes
        st.one_of(st.none(), st.integers(0, 20)),  # abort at this step
    ),
    min_size=1, max_size=14,
)


def _check(pool: BlockPool, scheduler: Scheduler, live: list[Sequence]) -> None:
    holders: Counter = Counter()
    owner: dict[int, tuple[Sequence, int]] = {}
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for i, block in enumerate(seq.block_table):
            holders[block] += 1
            if block in owner:  # shared: must be the same full prefix block of both
                other, j = owner[block]
                assert i == j and pool.enable_prefix_caching
                assert seq.token_ids[:(i + 1) * BLOCK] == other.token_ids[:(i + 1) * BLOCK]
                assert seq.num_computed_tokens >= (i + 1) * BLOCK or seq.num_computed_tokens == 0
            owner[block] = (seq, i)
    assert all(pool.ref_counts[b] == holders[b] for b in range(pool.num_blocks))
    assert pool.num_free == sum(1 for b in range(pool.num_blocks) if holders[b] == 0)
    assert len(scheduler.running) <= scheduler.max_num_seqs
    keys = [s.key for s in scheduler.waiting]
    assert keys == sorted(keys)


@settings(max_examples=150, deadline=None)
@given(requests, st.integers(6, 40), st.integers(4, 24), st.integers(1, 4), st.booleans())
def test_scheduler_invariants(trace, num_blocks, budget, max_seqs, caching):
    budget = max(budget, max_seqs)
    pool = BlockPool(num_blocks, BLOCK, caching)
    scheduler = Scheduler(pool, max_seqs, budget)
    families = [[7 + f] * 9 + [f] * 9 for f in range(4)]
    seqs: list[Sequence] = []
    admitted: list[Sequence] = []
    trace = sorted(trace, key=lambda r: r[0])  # arrival numbers follow arrival times, as the engine's do
    for arrival, (at, length, new, priority, family, abort) in enumerate(trace):
        prompt = (families[family] * 3)[:length]
        # Every request fits the pool alone (the engine caps max_model_len to it).
        new = max(1, min(new, num_blocks * BLOCK - length)) if length < num_blocks * BLOCK else 0
        if new:
            seqs.append(Sequence(arrival, str(arrival), 0, prompt, len(prompt), SamplingParams(max_tokens=new),
                                 arrival, priority))
            seqs[-1].arrive_at, seqs[-1].abort_at = at, abort
    for step in range(2000):
        for seq in seqs:
            if seq.arrive_at == step:
                scheduler.add(seq)
            if seq.abort_at == step and seq.status is not SequenceStatus.FINISHED and seq.arrive_at <= step:
                scheduler.finish(seq)
        batch = scheduler.schedule()
        assert sum(batch.num_tokens) <= budget and len(set(map(id, batch.seqs))) == len(batch.seqs)
        for seq in batch.seqs:
            if seq not in admitted:
                admitted.append(seq)
        _check(pool, scheduler, scheduler.running)
        scheduler.after_step(batch)
        for seq, count in zip(batch.seqs, batch.num_tokens):
            assert seq.num_computed_tokens <= seq.num_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(3)
                if seq.num_output_tokens == seq.params.max_tokens:
                    scheduler.finish(seq)
        if step > 6 and not scheduler.has_unfinished():
            break
    assert not scheduler.has_unfinished(), "a request never finished"
    assert pool.num_free == num_blocks and not any(pool.ref_counts)
    for priority in (0, 1):  # FIFO within a priority: first admissions in arrival order
        arrivals = [s.arrival for s in admitted if s.priority == priority]
        assert arrivals == sorted(arrivals)
