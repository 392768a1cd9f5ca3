"""The serving engine over tensor-parallel ranks: rank 0 runs the whole engine (HTTP, scheduling, sampling)
and, before each step, sends the step's flat inputs (`runner.StepInputs`: ids, positions, cache slots,
attention groups) to the other ranks; every rank then runs the same forward pass on its slices and its own
KV cache (its share of the key/value heads, in the same blocks), the collectives inside keep them in
lockstep, and only rank 0 samples. Rank 0's block allocator is the only one: the others' caches mirror it.

The step messages travel on a gloo group of their own with a long timeout, so the other ranks can wait for
an idle server's next request indefinitely; a rank 0 that dies closes the connection and they exit.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch.distributed as dist

from qwen2.distributed.group import broadcast_object
from qwen2.serving.async_engine import AsyncLLMEngine
from qwen2.serving.attention import KVCache
from qwen2.serving.engine import EngineConfig, LLMEngine, activation_dtype, kv_heads_of
from qwen2.serving.runner import ModelRunner, StepInputs, StepLogits
from qwen2.serving.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT = datetime.timedelta(days=30)  # how long a rank > 0 waits for the next step


class LockstepRunner(ModelRunner):
    """Rank 0's runner: sends each step's inputs to the other ranks, then runs its own part."""

    def __init__(self, model: Any, cache: KVCache, group: Any) -> None:
        super().__init__(model, cache)
        self.group = group

    def execute(self, batch: ScheduledBatch, prompt_logprob_rows: set[int]) -> StepLogits:
        inputs = self.prepare(batch, prompt_logprob_rows)
        broadcast_object(inputs, group=self.group)
        return self.run(inputs)

    def close(self) -> None:
        """Tell the other ranks to return from `run_worker`."""
        broadcast_object(None, group=self.group)


def _step_group() -> Any:
    """Collective: every rank calls it once, in the same order."""
    return dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)


def lockstep_engine(model: Any, tokenizer: Any, config: EngineConfig | None = None) -> LLMEngine:
    """Rank 0: an `LLMEngine` on its slices whose steps also run on the other ranks (which call `run_worker`).
    Call `engine.runner.close()` when done (`LockstepAsyncEngine.shutdown` does)."""
    group = _step_group()
    engine = LLMEngine(model, tokenizer, config)
    # The KV cache's size follows rank 0's free memory; the others allocate the same number of blocks.
    broadcast_object((engine.cache.num_blocks, engine.cache.block_size), group=group)
    engine.runner = LockstepRunner(model, engine.cache, group)
    return engine


class LockstepAsyncEngine(AsyncLLMEngine):
    """The server's engine on rank 0: once its loop has stopped, the other ranks are released."""

    async def shutdown(self, grace_seconds: float) -> None:
        await super().shutdown(grace_seconds)
        self.engine.runner.close()


def run_worker(model: Any) -> None:
    """Ranks > 0: run every step rank 0 sends until it sends None."""
    group = _step_group()
    num_blocks, block_size = broadcast_object(group=group)
    config = model.config
    cache = KVCache(config.num_hidden_layers, num_blocks, block_size, kv_heads_of(model), config.head_dim,
                    activation_dtype(model), next(model.parameters()).device)
    runner = ModelRunner(model, cache)
    logger.info("Rank %d: serving steps (%d KV blocks).", dist.get_rank(), num_blocks)
    while True:
        inputs: StepInputs | None = broadcast_object(group=group)
        if inputs is None:
            return
        runner.run(inputs)
