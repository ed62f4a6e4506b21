"""Prometheus metrics of a worker process, served on `/metrics` (INFERSTREAM_METRICS_PORT).

One registry per process: the agents, the batchers and the gatekeeper record into it; collectors
read live state (breakers, consumer lag) at scrape time. The bridge has metrics of its own
(`streams.bridge.app`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REGISTRY = CollectorRegistry()

# Stages of a request: intake (auth, limits, routing), inference, sink (PostgreSQL).
REQUESTS = Counter(
    "inferstream_requests", "Requests through each stage, by outcome: ok, rejected (dead-lettered) "
    "or refused (policy or outage; the caller gets an error)", ["stage", "outcome"], registry=REGISTRY,
)
ERRORS = Counter("inferstream_errors", "Rejected and refused requests by error code", ["stage", "code"],
                 registry=REGISTRY)
DEAD_LETTERS = Counter("inferstream_dead_letters", "Events sent to the dead-letter topic", ["stage", "reason"],
                       registry=REGISTRY)
STEP_RETRIES = Counter("inferstream_step_retries", "Agent steps retried after a service outage or an error",
                       ["stage"], registry=REGISTRY)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# queue_wait: created → picked up by the inference agent; batch_formation: submitted → its batch
# starts; inference: the backend call of a batch; end_to_end: created → reply produced;
# sink_delay: result produced → stored in PostgreSQL.
LATENCY = Histogram("inferstream_latency_seconds", "Latency per stage", ["stage", "model"],
                    buckets=LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram("inferstream_batch_size", "Items per backend batch", ["model", "backend"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
BACKEND_ERRORS = Counter("inferstream_backend_errors", "Failed backend batch calls", ["model", "backend"],
                         registry=REGISTRY)

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class BreakerCollector:
    """`inferstream_breaker_state{model,version,backend}`: 0 closed, 1 half-open, 2 open."""

    def __init__(self, states: Callable[[], Iterable[tuple[str, str, str, str]]]) -> None:
        self._states = states  # (model, version, backend, state) of every loaded backend

    def collect(self):
        gauge = GaugeMetricFamily("inferstream_breaker_state", "Circuit breaker per backend: 0 closed, "
                                  "1 half-open, 2 open", labels=["model", "version", "backend"])
        for model, version, backend, state in self._states():
            gauge.add_metric([model, version, backend], BREAKER_STATES[state])
        yield gauge


class ValueCounter:
    """A counter kept as a plain attribute elsewhere (read at scrape time)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self._read = name, documentation, read

    def collect(self):
        counter = CounterMetricFamily(self.name, self.documentation)
        counter.add_metric([], self._read())
        yield counter


def serve(port: int) -> None:
    """Serve the registry on 0.0.0.0:`port`/metrics from a daemon thread."""
    start_http_server(port, registry=REGISTRY)
