"""One sample of one request: its tokens, how many of them have KV in the cache, its block table, its state.

A request with `n` samples is `n` sequences sharing the prompt (their full prompt blocks are shared through
the prefix cache). The engine owns the text and outputs; the scheduler and runner only need what is here.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qwen2.generation.speculative import SpeculationControl
from qwen2.serving.outputs import Logprob
from qwen2.serving.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """The key of a full block: its tokens chained with the key of the block before it, so equal keys mean
    equal prefixes (vLLM's scheme). 128-bit BLAKE2b: a collision would silently serve the wrong KV."""
    digest = hashlib.blake2b(digest_size=16)
    if parent is not None:
        digest.update(parent)
    digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return digest.digest()


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # admission order key: FIFO within a priority
    priority: int = 0
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading full blocks already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    text: str = ""
    constraint: Any = None  # a qwen2.constrained.Constraint when the request has structured_outputs
    draft: list[int] = field(default_factory=list)  # n-gram speculation: tokens proposed for this step
    speculation: SpeculationControl | None = None
    _hashes: list[bytes] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, int]:
        """Scheduling order: lower runs first and is preempted last."""
        return self.priority, self.arrival

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def block_hashes(self, num_blocks: int, block_size: int) -> list[bytes]:
        """Keys of the first `num_blocks` full blocks (computed once each: full blocks never change)."""
        while len(self._hashes) < num_blocks:
            i = len(self._hashes)
            parent = self._hashes[-1] if self._hashes else None
            self._hashes.append(block_hash(parent, self.token_ids[i * block_size:(i + 1) * block_size]))
        return self._hashes[:num_blocks]
