"""LLMEngine: the synchronous serving loop. Requests are added and aborted between steps; each `step()` runs
one scheduled batch (decode rows first, then prefill chunks) on the paged KV cache and returns the outputs
of the requests that advanced. AsyncLLMEngine runs this loop on a thread; `LLM` wraps it for offline use."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from qwen2.serving.attention import KVCache
from qwen2.serving.block_pool import BlockPool
from qwen2.serving.errors import ContextLengthExceededError, QueueFullError
from qwen2.serving.memory import kv_cache_blocks
from qwen2.serving.outputs import CompletionOutput, RequestMetrics, RequestOutput
from qwen2.serving.params import SamplingParams
from qwen2.serving.runner import ModelRunner
from qwen2.serving.sampler import prompt_logprobs, sample
from qwen2.serving.scheduler import Scheduler
from qwen2.serving.sequence import Sequence
from qwen2.serving.structured import DEFAULT_COMPILE_TIMEOUT, MaskWorker, advance, compile_request_constraint
from qwen2.serving.speculation import NgramSpeculation
from qwen2.serving.text import StopChecker

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Limits of one engine. `kv_cache_memory` is bytes (int) or a fraction (0-1] of the memory available
    now; None takes a default (see qwen2.serving.memory). `max_model_len` None is the model's
    `max_position_embeddings`, lowered to what the KV cache can hold."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | float | None = None
    enable_prefix_caching: bool = True
    structured_outputs_timeout: float = DEFAULT_COMPILE_TIMEOUT  # seconds a request's grammar may take to compile
    # n-gram speculation (prompt lookup): up to this many draft tokens per decoding sequence, verified in the
    # step's one forward; 0 is off. Greedy outputs are those of the engine without it (qwen2.serving.speculation).
    speculative_ngram_tokens: int = 0


@dataclass
class EngineStats:
    """Counters for /metrics and tests. Prefix-cache queries and hits count prompt tokens (looked up / served
    from the cache); prompt_tokens counts prompt tokens computed (recomputation after preemption included),
    generation_tokens the tokens sampled; num_waiting counts sequences (a request has `n`)."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 seqs: list[Sequence], deadline: float | None, stops: list[StopChecker]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = seqs
        self.deadline = deadline
        self.stops = stops
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    """The synchronous core. Not thread-safe: one thread calls add_request/abort_request/step."""

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        if config.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {config.block_size}.")
        if config.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {config.max_waiting}.")
        ngram = config.speculative_ngram_tokens
        if not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 0:
            raise ValueError(f"speculative_ngram_tokens must be an integer >= 0, got {ngram!r}.")
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.model_config = model.config
        mc = model.config
        device = next(model.parameters()).device
        dtype = activation_dtype(model)
        kv_heads = kv_heads_of(model)
        num_blocks = kv_cache_blocks(config.kv_cache_memory, KVCache.bytes_per_block(
            mc.num_hidden_layers, config.block_size, kv_heads, mc.head_dim, dtype), device)
        self.cache = KVCache(mc.num_hidden_layers, num_blocks, config.block_size, kv_heads, mc.head_dim, dtype,
                             device)
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.speculation = NgramSpeculation(config.speculative_ngram_tokens) if ngram else None
        self.runner = ModelRunner(model, self.cache)
        limit = config.max_model_len or mc.max_position_embeddings
        capacity = num_blocks * config.block_size
        if limit > capacity:
            logger.warning("max_model_len %d is more than the KV cache holds (%d tokens): lowered to %d.",
                           limit, capacity, capacity)
        self.max_model_len = min(limit, capacity)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._requests: dict[str, _Request] = {}
        self._masks = MaskWorker()
        self._pending: list[RequestOutput] = []  # outputs of requests aborted or expired between steps
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        logger.info("KV cache: %d blocks of %d tokens (%.0f MiB, %s).", num_blocks, config.block_size,
                    num_blocks * KVCache.bytes_per_block(mc.num_hidden_layers, config.block_size, kv_heads,
                                                         mc.head_dim, dtype) / 2**20,
                    dtype)

    @classmethod
    def from_pretrained(cls, model: str, *, quantization: str | None = None, dtype: Any = None,
                        **engine_config: Any) -> LLMEngine:
        """Load a model (hub id, directory or GGUF file) and its tokenizer, then build an engine on them."""
        from qwen2.auto import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(model, quantization=quantization,
                                                      dtype="auto" if dtype is None else dtype).eval()
        return cls(loaded, AutoTokenizer.from_pretrained(model), EngineConfig(**engine_config))

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    deadline: float | None = None, prompt: str | None = None, priority: int = 0,
                    constraint: Any = None) -> None:
        """Queue a request. `deadline` is a time.time() after which it finishes with reason "timeout";
        lower `priority` values are admitted first (FIFO within a priority). Raises QueueFullError,
        ContextLengthExceededError, or ValueError (duplicate id, empty prompt, ids outside the vocabulary, an
        invalid `structured_outputs`). `constraint`: `params.structured_outputs` already compiled
        (`compile_constraint`), so a caller can compile it off the engine's thread."""
        if request_id in self._requests:
            raise ValueError(f"A request with id {request_id!r} is already running.")
        self.check_request(prompt_token_ids, params)
        if self.num_waiting_requests() >= self.config.max_waiting:
            raise QueueFullError(f"The engine's queue is full ({self.config.max_waiting} waiting requests).")
        if constraint is None:
            constraint = self.compile_constraint(params)
        arrival = next(self._arrivals)
        seqs = [Sequence(next(self._seq_ids), request_id, index, list(prompt_token_ids), len(prompt_token_ids),
                         params, arrival, priority, _generator(params.seed, index, self.cache.keys[0].device),
                         logprobs=[] if params.logprobs is not None else None)
                for index in range(params.n)]
        if constraint is not None:
            for seq in seqs:  # the last sample takes the compiled one, the others a copy each
                seq.constraint = constraint.fork() if seq is not seqs[-1] else constraint
        stops = [StopChecker(self.tokenizer, params) for _ in seqs]
        request = _Request(request_id, prompt, list(prompt_token_ids), params, seqs, deadline, stops)
        self._requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The checks `add_request` makes on the prompt and limits (for callers that validate up front)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}.")
        if not prompt_token_ids:
            raise ValueError("The prompt is empty: give at least one token.")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"Prompt token ids must be integers in [0, {vocab}).")
        wanted = len(prompt_token_ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise ContextLengthExceededError(
                f"The prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) is "
                f"{wanted} tokens, more than this engine's max_model_len ({self.max_model_len}).")
        if params.stop and self.tokenizer is None:
            raise ValueError("Stop strings need the engine to have a tokenizer.")

    def compile_constraint(self, params: SamplingParams) -> Any:
        """`params.structured_outputs` compiled for this engine's tokenizer and end tokens (None without one);
        ValueError if it is invalid or takes longer than `structured_outputs_timeout` to compile."""
        return compile_request_constraint(self.tokenizer, self.eos_token_ids, params,
                                          self.config.structured_outputs_timeout)

    def num_waiting_requests(self) -> int:
        return sum(1 for r in self._requests.values() if not any(s.admitted for s in r.seqs))

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and return its KV blocks to the pool; unknown or finished ids are ignored. Its
        final output (finish_reason "abort") comes with the next `step()`."""
        self._end(request_id, "abort")

    def _end(self, request_id: str, reason: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = reason
                seq.constraint = None
        request.metrics.finished_time = time.time()
        self._pending.append(self._output(request))

    # ------------------------------------------------------------------ the loop
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return a snapshot of every request that advanced or finished."""
        self._expire()
        outputs, self._pending = self._pending, []
        if self.speculation is not None:
            self.speculation.propose(self.scheduler.running, self.max_model_len)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return outputs
        wants_prompt = {row for row, seq in enumerate(batch.seqs) if self._wants_prompt_logprobs(seq)}
        sampling = [seq for seq, count in zip(batch.seqs, batch.num_tokens)
                    if seq.num_computed_tokens + count == seq.num_tokens]
        masks = self._masks.start(sampling)  # computed beside the forward
        logits = self.runner.execute(batch, wants_prompt)
        if masks is not None:
            masks.apply(logits.logits)
        self.scheduler.after_step(batch)
        self._prompt_tokens += sum(n for s, n in zip(batch.seqs, batch.num_tokens) if not s.num_output_tokens)
        touched: dict[str, _Request] = {}
        for row, (first, rows) in logits.prompt_logits.items():
            self._record_prompt_logprobs(batch.seqs[row], first, rows)
        if logits.sample_rows:
            seqs = [batch.seqs[row] for row in logits.sample_rows]
            result = sample(logits.logits, seqs, [self._stop_ids(s) for s in seqs])
            now = time.time()
            for seq, token, logprob in zip(seqs, result.tokens, result.logprobs):
                request = self._requests[seq.request_id]
                self._append(request, seq, token, logprob)
                if request.metrics.first_token_time is None:
                    request.metrics.first_token_time = now
                touched[seq.request_id] = request
        for row, rows in logits.draft_logits.items():
            seq = batch.seqs[row]
            request = self._requests[seq.request_id]
            self._verify(request, seq, rows)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = time.time()
            touched[seq.request_id] = request
        for request in touched.values():
            if request.finished:
                del self._requests[request.request_id]
                request.metrics.finished_time = time.time()
            outputs.append(self._output(request))
        return outputs

    def _verify(self, request: _Request, seq: Sequence, logits: torch.Tensor) -> None:
        """Take a speculative row's tokens: each position is sampled as a plain step would (so greedy picks the
        same tokens and sampling keeps its distribution: the draft's q is one-hot), and the draft is kept while
        it agrees. Its verified positions' keys/values become the sequence's; blocks past them are freed."""
        draft, seq.draft = seq.draft, []
        accepted = 0
        for i in range(len(draft) + 1):
            result = sample(logits[i:i + 1], [seq], [self._stop_ids(seq)])
            token = result.tokens[0]
            self._append(request, seq, token, result.logprobs[0])
            if seq.is_finished or i == len(draft) or token != draft[i]:
                break
            accepted += 1
            self.scheduler.computed(seq, 1)  # draft[i] is the sequence's token: its keys/values stand
        self.speculation.verified(seq, len(draft), accepted)
        if not seq.is_finished:
            self.scheduler.trim(seq)

    def _expire(self) -> None:
        now = time.time()
        for request in [r for r in self._requests.values() if r.deadline is not None and r.deadline <= now]:
            self._end(request.request_id, "timeout")

    def _wants_prompt_logprobs(self, seq: Sequence) -> bool:
        request = self._requests[seq.request_id]
        return (request.prompt_logprobs is not None and seq.index == 0
                and len(request.prompt_logprobs) < seq.num_prompt_tokens)

    def _record_prompt_logprobs(self, seq: Sequence, first: int, logits: torch.Tensor) -> None:
        """Logits at position p give the logprob of prompt token p + 1; positions already recorded (a
        recomputation after preemption) are skipped."""
        recorded = self._requests[seq.request_id].prompt_logprobs
        begin = len(recorded) - 1 - first  # row of the first position not yet recorded
        end = min(logits.shape[0], seq.num_prompt_tokens - 1 - first)
        if end > begin:
            targets = seq.token_ids[first + begin + 1:first + end + 1]
            recorded.extend(prompt_logprobs(logits[begin:end], targets, seq.params.prompt_logprobs))

    def _stop_ids(self, seq: Sequence) -> set[int]:
        ids = set(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    def _append(self, request: _Request, seq: Sequence, token: int, logprob: dict | None) -> None:
        seq.token_ids.append(token)
        self._generation_tokens += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob[token].logprob
        params = seq.params
        stop = request.stops[seq.index]
        if not advance(seq, token):
            seq.finish_reason = "stop"
        elif not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        stop.update(seq.output_token_ids)
        if seq.finish_reason is None and stop.matched is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop.matched
        if seq.finish_reason is None and (seq.num_output_tokens == params.max_tokens
                                          or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            seq.constraint = None

    def _output(self, request: _Request) -> RequestOutput:
        completions = []
        for seq, stop in zip(request.seqs, request.stops):
            completions.append(CompletionOutput(
                index=seq.index,
                text=stop.text(final=seq.is_finished),
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            ))
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
            outputs=completions,
            finished=request.finished,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            metrics=RequestMetrics(request.metrics.arrival_time, request.metrics.first_token_time,
                                   request.metrics.finished_time),
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_free=self.pool.num_free,
            prefix_cache_queries=self.pool.queries,
            prefix_cache_hits=self.pool.hits,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            num_preemptions=self.scheduler.num_preemptions,
        )


def kv_heads_of(model: Any) -> int:
    """Key/value heads the model's attention computes: the config's, or a tensor-parallel rank's share."""
    return getattr(model, "model", model).layers[0].self_attn.num_key_value_heads


def activation_dtype(model: Any) -> torch.dtype:
    """The dtype the model computes keys and values in: its embeddings' (quantised linears keep it too)."""
    dtype = model.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """generate()'s end-of-sequence ids: the generation config's, else the model config's, else the
    tokenizer's."""
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}
    return set()


def _generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """A private generator per sample of a seeded request (sample i of seed s is seeded from (s, i))."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + index) % 2**63)
