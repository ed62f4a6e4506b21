"""Prometheus metrics of a worker process, served on `/metrics` (INFERSTREAM_METRICS_PORT), and
its liveness on `/healthz` of the same port.

One registry per process: the agents, the batchers and the gatekeeper record into it; collectors
read live state (breakers, consumer lag) at scrape time. The bridge has metrics of its own
(`streams.bridge.app`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
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


# The worker's event loop marks itself alive this often; /healthz fails once the mark is older
# than LOOP_STALE_AFTER_S (a loop blocked that long serves no request, heartbeat or commit).
LOOP_BEAT_S = 1.0
LOOP_STALE_AFTER_S = 20.0


class LoopLiveness:
    """When the event loop last turned. The metrics server is a thread of its own that answers
    while the loop is stuck, so /metrics alone proves nothing; /healthz asks this instead."""

    def __init__(self, stale_after_s: float = LOOP_STALE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._last_beat: float | None = None

    def beat(self) -> None:
        """Called from the event loop."""
        self._last_beat = self._clock()

    def check(self) -> tuple[bool, str]:
        """(alive, why): alive once the loop has beaten within `stale_after_s`."""
        if self._last_beat is None:
            return False, "event loop not started"
        age = self._clock() - self._last_beat
        if age > self.stale_after_s:
            return False, f"event loop stuck: last turn {age:.1f} s ago (limit {self.stale_after_s:g} s)"
        return True, f"event loop turned {age:.1f} s ago"


def metrics_app(liveness: LoopLiveness) -> Callable[..., Any]:
    """WSGI app: /healthz answers 200 while the loop turns and 503 once it is stuck; every other
    path serves the registry (as prometheus_client does)."""
    registry_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return registry_app(environ, start_response)
        alive, why = liveness.check()
        start_response("200 OK" if alive else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [why.encode() + b"\n"]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scrape never holds the worker's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: no access line each."""


def serve(host: str, port: int, liveness: LoopLiveness) -> WSGIServer:
    """Serve /metrics and /healthz on `host`:`port` from a daemon thread."""
    server = make_server(host, port, metrics_app(liveness), _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
