"""Who runs this step: decode rows first, then prefill chunks, under a per-step token budget.

Each step the running sequences that are decoding get one token each (oldest first), then sequences part-way
through their prompt get chunks, then waiting requests are admitted in (priority, arrival) order while the
budget, `max_num_seqs` and free blocks allow (Sarathi-Serve's chunked prefill: a long prompt is spread over
steps and never stalls the decoders). When a running sequence needs a block and none is free, the youngest
running sequence is preempted: its blocks are released and it waits to be recomputed (its prefix may still be
in the cache). Waiting requests never preempt running ones, and a request is admitted only when its turn
comes, so nobody overtakes within a priority.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from qwen2.serving.block_pool import BlockPool
from qwen2.serving.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The sequences of one step in the order the runner lays out their tokens, and each one's token count
    (1 for a decode row, a chunk for a prefill)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, count: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(count)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"Need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs, got "
                             f"{max_num_seqs} and {max_num_batched_tokens}.")
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by Sequence.key
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished, aborted, timed out): its blocks return to the pool at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        decoding.sort(key=lambda s: bool(s.draft))  # one-token rows first: the runner's decode group
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted by an older sequence of this step
            count = min(seq.num_uncomputed_tokens + len(seq.draft), budget)
            seq.draft = seq.draft[:max(count - seq.num_uncomputed_tokens, 0)]  # a draft only fills spare budget
            while not self._grow(seq, seq.num_computed_tokens + count):
                victim = max((s for s in self.running if s not in batch.seqs), key=lambda s: s.key)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.add(seq, count)
                budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            count = self._admit(self.waiting[0], budget)
            if count == 0:
                break
            seq = self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, count)
            budget -= count
        return batch

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens if the pool has them."""
        missing = -(-num_tokens // self.block_size) - len(seq.block_table)
        if missing > self.pool.num_free:
            return False
        if missing > 0:
            seq.block_table.extend(self.pool.allocate(missing))
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Blocks for a waiting sequence's cached prefix and first chunk; the chunk's size, 0 if they do not
        fit. At least one token is always computed (its logits give the next token)."""
        cached: list[int] = []
        if self.pool.enable_prefix_caching and seq.params.prompt_logprobs is None:
            full = (seq.num_tokens - 1) // self.block_size
            cached = self.pool.cached_prefix(seq.block_hashes(full, self.block_size))
        computed = len(cached) * self.block_size
        count = min(seq.num_tokens - computed, budget)
        new = -(-(computed + count) // self.block_size) - len(cached)
        if self.pool.num_needed(cached, new) > self.pool.num_free:
            return 0
        self.pool.take(cached)
        seq.block_table = cached + self.pool.allocate(new)
        seq.num_computed_tokens = computed
        seq.num_registered_blocks = len(cached)
        if not seq.admitted:
            seq.admitted = True
            seq.num_cached_tokens = min(computed, seq.num_prompt_tokens)
            self.pool.queries += seq.num_prompt_tokens
            self.pool.hits += seq.num_cached_tokens
        return count

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Recompute later: release the blocks, keep the tokens."""
        self.running.remove(seq)
        self._release(seq)
        seq.draft = []
        self.add(seq)
        self.num_preemptions += 1
        batch.preempted.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advance the computed counts and offer newly full blocks to the prefix cache. A speculative row's
        draft positions count only once verified (`computed`)."""
        for seq, count in zip(batch.seqs, batch.num_tokens):
            self.computed(seq, count - len(seq.draft))

    def computed(self, seq: Sequence, count: int) -> None:
        """`count` more of `seq`'s tokens have their keys/values in its blocks."""
        seq.num_computed_tokens += count
        full = seq.num_computed_tokens // self.block_size
        if full > seq.num_registered_blocks and self.pool.enable_prefix_caching:
            keys = seq.block_hashes(full, self.block_size)
            for i in range(seq.num_registered_blocks, full):
                self.pool.register(seq.block_table[i], keys[i])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past the sequence's computed tokens (those that held only a rejected draft's
        keys/values), as a plain decode step leaves it."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.pool.release(seq.block_table[keep:])
            del seq.block_table[keep:]
