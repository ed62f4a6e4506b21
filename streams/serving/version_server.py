"""Serving one model version on its backends (those its record names, built from the table in
`streams.serving.backends`), each behind its own micro-batcher, picked by least outstanding
requests, each with a circuit breaker. A backend failure retries the request on another backend;
with every breaker open the request fails at once (UNAVAILABLE) instead of queueing until its
deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import cast

from streams.registry.records import BackendSpec, ModelInfo
from streams.serving.backends import Backend, Tensors, backend_class
from streams.serving.balancer import Balancer
from streams.serving.batcher import AdaptiveBatcher, BatcherStopped
from streams.serving.breaker import CircuitBreaker
from streams.settings import Settings
from streams.telemetry.metrics import BACKEND_ERRORS, BATCH_SIZE, LATENCY
from streams.telemetry.model_stats import STATS
from topics.errors import ErrorCode, EventError

log = logging.getLogger(__name__)


class ServerStopped(Exception):
    """A model server of this worker stopped (shutdown, reload) under a request: not the request's
    fault, and no answer for it; the chunk is retried, by this worker or the next owner."""


@dataclass
class Outcome:
    """What a backend produced for one request."""

    outputs: Tensors
    inference_ms: float
    batch_size: int
    backend: str


@dataclass
class ServedBackend:
    """One backend of the version, behind its own micro-batcher."""

    spec: BackendSpec
    model: Backend  # the version's model there
    batcher: AdaptiveBatcher

    @property
    def name(self) -> str:
        return self.spec.label


def _timed(run_batch, label: str):
    """Wrap a backend's batch call so each outcome records the batch's time, size and backend."""

    def outcomes(results: list, elapsed_ms: float, size: int) -> list:
        return [r if isinstance(r, BaseException) else Outcome(r, elapsed_ms, size, label) for r in results]

    if asyncio.iscoroutinefunction(run_batch):
        async def run_async(batch: list) -> list:
            t0 = time.perf_counter()
            results = await run_batch(batch)
            return outcomes(results, (time.perf_counter() - t0) * 1000, len(batch))

        return run_async

    def run(batch: list) -> list:
        t0 = time.perf_counter()
        results = run_batch(batch)
        return outcomes(results, (time.perf_counter() - t0) * 1000, len(batch))

    return run


async def _serve_backend(info: ModelInfo, spec: BackendSpec, settings: Settings) -> ServedBackend:
    model = await backend_class(spec.kind).load(info, spec, settings)
    batcher: AdaptiveBatcher[Tensors, Outcome] = AdaptiveBatcher(
        _timed(model.run_batch, spec.label),
        max_batch_size=min(settings.max_batch_size, info.max_batch_size),
        max_delay=(settings.max_batch_delay_ms if info.max_batch_delay_ms is None else info.max_batch_delay_ms) / 1000,
        max_pending=settings.max_inflight,
        name=f"{info.key}@{spec.label}",
        observe=_batch_metrics(info, spec.label),
    )
    await batcher.start()
    return ServedBackend(spec, model, batcher)


def _batch_metrics(info: ModelInfo, backend: str):
    model = info.name
    batch_size, formation = BATCH_SIZE.labels(model, backend), LATENCY.labels("batch_formation", model)
    inference, errors = LATENCY.labels("inference", model), BACKEND_ERRORS.labels(model, backend)

    def observe(waits: list[float], run_s: float, failed: bool) -> None:
        batch_size.observe(len(waits))
        for wait in waits:
            formation.observe(wait)
        inference.observe(run_s)
        if failed:
            errors.inc()
        else:
            STATS.execution(model, info.version, len(waits), run_s)

    return observe


class VersionServer:
    def __init__(self, info: ModelInfo, backends: list[ServedBackend], settings: Settings) -> None:
        self.info = info
        self.backends = backends
        self.balancer: Balancer[ServedBackend] = Balancer(
            {b.name: b for b in backends},
            lambda: CircuitBreaker(failure_threshold=settings.breaker_failures,
                                   cooldown_s=settings.breaker_cooldown_s),
        )

    @classmethod
    async def create(cls, info: ModelInfo, settings: Settings) -> VersionServer:
        backends = [await _serve_backend(info, spec, settings) for spec in info.backends]
        return cls(info, backends, settings)

    async def stop(self) -> None:
        for backend in self.backends:
            await backend.batcher.stop()
            await backend.model.close()

    async def submit(self, requests: list[Tensors]) -> list[Outcome | BaseException]:
        """Run a chunk's requests: each gets its outcome or its own error (an EventError for the
        request's fault or UNAVAILABLE, ServerStopped while stopping). Each request goes to the
        backend with the fewest outstanding requests, so a chunk spreads over the backends; they
        are queued, then awaited, with no task per request. A request a backend failed is tried
        again on another it has not tried."""
        results: list[Outcome | BaseException | None] = [None] * len(requests)
        tried: list[list[ServedBackend]] = [[] for _ in requests]
        todo = list(range(len(requests)))
        last_error: BaseException | None = None
        while todo:
            placed: dict[str, list[int]] = {}  # by backend name, in the order picked
            backends: dict[str, ServedBackend] = {}
            unplaced = []
            for i in todo:
                backend = self.balancer.pick(exclude=tried[i])
                if backend is None:
                    unplaced.append(i)
                    continue
                self.balancer.begin(backend)
                tried[i].append(backend)
                backends[backend.name] = backend
                placed.setdefault(backend.name, []).append(i)
            failed = await self._run_placed(requests, placed, backends, results)
            if failed:
                last_error = failed[-1][1]
                log.warning("%s: %d requests failed on a backend (%r); trying the others", self.info.key,
                            len(failed), last_error)
            for i in unplaced:
                states = ", ".join(f"{name}: {state}" for name, state in self.balancer.states().items())
                results[i] = EventError(
                    ErrorCode.UNAVAILABLE,
                    f"no backend of {self.info.key} is available ({states})"
                    + (f"; last error: {last_error!r}" if last_error else ""),
                )
            todo = [i for i, _ in failed]
        return cast(list[Outcome | BaseException], results)

    async def _run_placed(self, requests: list[Tensors], placed: dict[str, list[int]],
                          backends: dict[str, ServedBackend],
                          results: list[Outcome | BaseException | None]) -> list[tuple[int, BaseException]]:
        """Queue each backend's share (its last item marked), await every future, and record each
        outcome; the requests that failed for a backend fault, with their errors. Every `begin`
        the caller made is ended here, whatever happens."""
        order = [(i, backends[name], n == len(share)) for name, share in placed.items()
                 for n, i in enumerate(share, 1)]
        futures: list[asyncio.Future[Outcome]] = []
        failed: list[tuple[int, BaseException]] = []
        ended = 0
        try:
            for i, backend, last in order:
                futures.append(await backend.batcher.enqueue(requests[i], last=last))
            for (i, backend, _), future in zip(order, futures):
                ok = True
                try:
                    results[i] = await future
                except EventError as error:
                    results[i] = error  # the request's own fault: the backend is fine
                except BatcherStopped:
                    results[i] = ServerStopped(f"{self.info.key} stopped")
                except Exception as exc:  # noqa: BLE001 - a backend fault: try another
                    ok = False
                    failed.append((i, exc))
                self.balancer.end(backend, ok=ok)
                ended += 1
        except BaseException as exc:
            for future in futures[ended:]:
                future.cancel()  # the caller went away, or a batcher stopped: nothing to compute
            for _, backend, _ in order[ended:]:
                self.balancer.end(backend, ok=True)  # no verdict on the backend
            if isinstance(exc, BatcherStopped):
                raise ServerStopped(f"{self.info.key} stopped") from None
            raise
        return failed
