"""Generation metrics per adapter in the Prometheus text format (``GET /metrics`` with an
``Accept: text/plain`` or OpenMetrics header, as a Prometheus scraper sends).

Each app has its own registry, so several apps in one process (tests) do not share counts.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

#: time-to-first-token buckets (seconds): CPU prefill of a long prompt can take seconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def wants_prometheus(accept: str | None) -> bool:
    """True when an ``Accept`` header asks for the Prometheus / OpenMetrics text format."""
    accept = (accept or "").lower()
    return "text/plain" in accept or "openmetrics" in accept


class GenerationMetrics:
    """Time to first token, tokens made, tokens/s per request, running and waiting sequences."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("deltatune_time_to_first_token_seconds", "Arrival to first new token",
                              ["adapter"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens = PromCounter("deltatune_generated_tokens", "New tokens made", ["adapter"], registry=r)
        self.rate = Histogram("deltatune_request_tokens_per_second", "New tokens per second of a finished "
                              "request, first token to last", ["adapter"], buckets=RATE_BUCKETS, registry=r)
        self.requests = PromCounter("deltatune_generation_requests", "Finished generation requests",
                                    ["adapter", "finish_reason"], registry=r)
        self.running = Gauge("deltatune_running_sequences", "Sequences in the running batch", ["adapter"], registry=r)
        self.waiting = Gauge("deltatune_waiting_sequences", "Sequences waiting to join", ["adapter"], registry=r)
        self.step_seconds = Histogram("deltatune_step_seconds", "One continuous-batching step (decode + prefill)",
                                      buckets=TTFT_BUCKETS, registry=r)
        self._gauged: set[str] = set()

    def observe_step(self, scheduler, seconds: float, finished: list) -> None:
        """Record one scheduler step (``Scheduler.on_step``)."""
        self.step_seconds.observe(seconds)
        for gen in [*scheduler.running, *finished]:
            seq = gen.seq
            if seq.tokens and not gen.reported_tokens:
                self.ttft.labels(seq.adapter).observe(gen.first_token_at - gen.arrived)
            if len(seq.tokens) > gen.reported_tokens:
                self.tokens.labels(seq.adapter).inc(len(seq.tokens) - gen.reported_tokens)
                gen.reported_tokens = len(seq.tokens)
        for gen in finished:
            seq = gen.seq
            self.requests.labels(seq.adapter, "cancelled" if seq.cancelled and not seq.done
                                 else seq.finish_reason).inc()
            span = gen.finished_at - gen.first_token_at if gen.first_token_at else 0
            if len(seq.tokens) > 1 and span > 0:
                self.rate.labels(seq.adapter).observe((len(seq.tokens) - 1) / span)
        self._gauge(self.running, Counter(g.seq.adapter for g in scheduler.running))
        self._gauge(self.waiting, Counter(g.seq.adapter for g in scheduler.waiting))

    def _gauge(self, gauge: Gauge, counts: Counter) -> None:
        self._gauged |= set(counts)
        for name in self._gauged:  # adapters seen before and idle now read 0, not their last value
            gauge.labels(name).set(counts.get(name, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
