"""Prometheus metrics for /metrics: the engine's gauges and counters read at scrape time, and the server's own
per-request histograms (TTFT, time per output token, end-to-end latency) observed as requests finish.
Each app has its own registry, so several servers in one process (tests) do not collide."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qwen2.serving.engine import EngineStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


@dataclass
class RequestRecord:
    """What one HTTP request did, filled in by its handler and logged (one line) when its response ends."""

    request_id: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    arrival: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._stats()
        if stats is None:  # still loading
            return
        gauges = {
            "qwen2_requests_running": ("requests in the running batch", stats.num_running),
            "qwen2_requests_waiting": ("requests waiting to be scheduled", stats.num_waiting),
            "qwen2_kv_blocks_total": ("KV cache blocks in the pool", stats.kv_blocks_total),
            "qwen2_kv_blocks_in_use": ("KV cache blocks held by requests",
                                       stats.kv_blocks_total - stats.kv_blocks_free),
            "qwen2_prefix_cache_hit_rate": ("prompt tokens served from the prefix cache / prompt tokens looked up",
                                            stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "qwen2_prefix_cache_queries_tokens": ("prompt tokens looked up in the prefix cache",
                                                  stats.prefix_cache_queries),
            "qwen2_prefix_cache_hits_tokens": ("prompt tokens found in the prefix cache", stats.prefix_cache_hits),
            "qwen2_engine_prompt_tokens": ("prompt tokens the engine processed", stats.prompt_tokens),
            "qwen2_engine_generation_tokens": ("tokens the engine generated", stats.generation_tokens),
            "qwen2_preemptions": ("requests preempted for KV space", stats.num_preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("qwen2_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("qwen2_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("qwen2_generation_tokens", "generated tokens of finished requests",
                                         registry=self.registry)
        self.ttft = Histogram("qwen2_time_to_first_token_seconds", "time to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("qwen2_time_per_output_token_seconds", "mean time per output token after the first",
                              buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("qwen2_e2e_request_latency_seconds", "arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats))

    def observe(self, route: str, status: int, record: RequestRecord) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        if record.finished is None:
            return
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)
        self.e2e.observe(record.finished - record.arrival)
        if record.first_token is not None:
            self.ttft.observe(record.first_token - record.arrival)
            if record.completion_tokens > 1:
                self.tpot.observe((record.finished - record.first_token) / (record.completion_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
