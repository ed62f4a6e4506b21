"""`inferstream load`: an open-loop load generator for the HTTP bridge or the Kafka ingress.

Open loop: request i of the measured window is due at `warmup + i / rate` seconds after the
start and is started at that time whether or not earlier requests have answered. A slow system
therefore shows as latency, timeouts and errors, never as a lower offered rate (no coordinated
omission); latency counts from the due time, so a client that falls behind its schedule shows
too. `max_inflight` bounds the requests in flight: one that is due while the bound is reached is
not started and counts as dropped.

The pieces: `schedule` (the send times), `InflightGate` (the bound), `run_load` (the dispatcher,
given any async `send`), `summarize` / `percentiles` (pure figures from the attempts), the two
targets (`BridgeTarget`, `KafkaTarget`) and `summary_table` for the CLI.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

OK, ERROR, TIMEOUT, DROPPED = "ok", "error", "timeout", "dropped"
DEFAULT_MAX_INFLIGHT = 1000
PERCENTILES = (50, 90, 99)
_START_LEAD_S = 0.05  # time to get going before the first request is due
_POOL_SIZE = 16  # distinct random payloads, cycled


# -- schedule and bound -------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    due: float  # seconds after the start
    counted: bool  # False: a warm-up request


def schedule(rate: float, duration: float, warmup: float = 0.0) -> list[Slot]:
    """Open-loop send times: `rate` per second for `warmup` seconds (not counted), then for
    `duration` seconds (counted). Times depend only on the clock, never on replies."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if duration <= 0 or warmup < 0:
        raise ValueError("duration must be positive and warmup not negative")
    warm = math.floor(rate * warmup + 1e-9)
    counted = math.floor(rate * duration + 1e-9)
    slots = [Slot(i / rate, False) for i in range(warm)]
    slots += [Slot(warmup + i / rate, True) for i in range(counted)]
    return slots


class InflightGate:
    """At most `limit` requests in flight (None: no bound); a refused request is dropped."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("max inflight must be at least 1")
        self.limit = limit
        self.inflight = 0
        self.peak = 0

    def try_acquire(self) -> bool:
        if self.limit is not None and self.inflight >= self.limit:
            return False
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        return True

    def release(self) -> None:
        self.inflight -= 1


# -- attempts and figures ----------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What a target says about one request: `OK`, `ERROR` (with a code) or `TIMEOUT`."""

    status: str
    code: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Attempt:
    """One scheduled request of a load run, and what became of it."""

    due: float  # seconds after the start, as scheduled
    started: float | None  # None: dropped
    done: float
    status: str  # OK, ERROR, TIMEOUT or DROPPED
    code: str | None = None
    request_id: str | None = None

    @property
    def latency_s(self) -> float:
        """From the due time, not the actual start: falling behind the schedule counts."""
        return self.done - self.due


def percentiles(values: Sequence[float], qs: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """`p<q>` (linear interpolation between closest ranks, numpy's default) and `max`; None for
    every figure when there are no values."""
    if len(values) == 0:
        return {**{f"p{q:g}": None for q in qs}, "max": None}
    array = np.asarray(values, dtype=np.float64)
    figures: dict[str, float | None] = {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(array, qs))}
    figures["max"] = float(array.max())
    return figures


def summarize(attempts: Sequence[Attempt], rate: float, duration: float, **about: Any) -> dict[str, Any]:
    """The run's figures from its counted attempts. `about` (target, model, ...) is copied in.

    offered_rate: requests scheduled per second of the measured window; achieved_rate: ok
    replies per second, over the window or, when replies came in after it, until the last one.
    Latency percentiles are in ms, of ok requests only.
    """
    ok = [o for o in attempts if o.status == OK]
    errors = Counter(o.code or "UNKNOWN" for o in attempts if o.status == ERROR)
    started = [o for o in attempts if o.started is not None]
    if attempts:
        first_due = min(o.due for o in attempts)
        elapsed = max(duration, max(o.done for o in attempts) - first_due)
    else:
        elapsed = duration
    lags = [o.started - o.due for o in attempts if o.started is not None]
    return {
        **about,
        "rate": rate,
        "duration_s": duration,
        "scheduled": len(attempts),
        "sent": len(started),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_count": sum(errors.values()),
        "timeouts": sum(o.status == TIMEOUT for o in attempts),
        "dropped": sum(o.status == DROPPED for o in attempts),
        "offered_rate": len(attempts) / duration,
        "achieved_rate": len(ok) / elapsed,
        "elapsed_s": elapsed,
        "latency_ms": {k: None if v is None else v * 1000 for k, v in
                       percentiles([o.latency_s for o in ok]).items()},
        "max_send_lag_ms": max(lags) * 1000 if lags else None,
    }


@dataclass
class Tally:
    """Counts so far, for a progress line a second: requests started, answered ok, answered with
    an error or timed out, dropped (warm-up included)."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    dropped: int = 0
    started: float = field(default_factory=time.monotonic)

    def count(self, status: str) -> None:
        if status == OK:
            self.ok += 1
        elif status == DROPPED:
            self.dropped += 1
        else:
            self.errors += 1

    def line(self, now: float | None = None) -> str:
        elapsed = max((time.monotonic() if now is None else now) - self.started, 1e-9)
        return (f"{elapsed:6.1f} s  sent {self.sent}  answered {self.ok}  errors {self.errors}  "
                f"dropped {self.dropped}  {self.ok / elapsed:,.1f} ok/s")


# -- the dispatcher ----------------------------------------------------------------------------


Send = Callable[[int], Awaitable[Reply]]  # called with the request's index in the schedule


async def run_load(send: Send, slots: Sequence[Slot], *, max_inflight: int | None = DEFAULT_MAX_INFLIGHT,
                   timeout: float = 10.0, grace: float = 1.0,
                   clock: Callable[[], float] = time.monotonic, tally: Tally | None = None) -> list[Attempt]:
    """Start `send(i)` at each slot's due time; the counted slots' attempts, in schedule order.

    Each send is bounded by `timeout` + `grace` (time for the target's own deadline, set from
    the same timeout, to answer first); the call returns once every started request has
    answered or timed out. `tally`, when given, counts the requests as they start and end.
    """
    tally = tally or Tally()
    gate = InflightGate(max_inflight)
    attempts: list[Attempt | None] = [None] * len(slots)
    tasks: set[asyncio.Task] = set()
    start = clock() + _START_LEAD_S

    async def one(index: int, slot: Slot, started: float) -> None:
        try:
            async with asyncio.timeout(timeout + grace):
                reply = await send(index)
        except TimeoutError:
            reply = Reply(TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - counted as an error by its type, not raised
            reply = Reply(ERROR, type(exc).__name__)
        finally:
            gate.release()
        tally.count(reply.status)
        attempts[index] = Attempt(slot.due, started, clock() - start, reply.status, reply.code, reply.request_id)

    for index, slot in enumerate(slots):
        delay = start + slot.due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        now = clock() - start
        if not gate.try_acquire():
            attempts[index] = Attempt(slot.due, None, now, DROPPED)
            tally.count(DROPPED)
            continue
        tally.sent += 1
        task = asyncio.create_task(one(index, slot, now))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return [o for o, slot in zip(attempts, slots) if slot.counted and o is not None]


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def parse_shapes(specs: Sequence[str]) -> dict[str | None, tuple[int, ...]]:
    """`--shape` values: `NAME=D1,D2,...` for one input, or `D1,D2,...` for every input."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for spec in specs:
        name, _, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise ValueError(f"--shape takes [NAME=]D1,D2,..., got {spec!r}") from None
        if not shape or any(d < 0 for d in shape):
            raise ValueError(f"--shape takes [NAME=]D1,D2,... (non-negative), got {spec!r}")
        shapes[name or None] = shape
    return shapes


def resolve_specs(signature: Sequence[tuple[str, Any, Sequence[int]]],
                  shapes: dict[str | None, tuple[int, ...]] | None = None) -> list[InputSpec]:
    """Concrete input specs from a signature of (name, numpy dtype, shape with -1 for dynamic
    axes): a `--shape` for the input wins, dynamic axes become 1."""
    shapes = shapes or {}
    unknown = {name for name in shapes if name is not None} - {name for name, _, _ in signature}
    if unknown:
        raise ValueError(f"--shape names no input of the model: {sorted(unknown)}")
    specs = []
    for name, dtype, shape in signature:
        chosen = shapes.get(name, shapes.get(None))
        specs.append(InputSpec(name, np.dtype(dtype), chosen or tuple(1 if d < 0 else d for d in shape)))
    return specs


def random_inputs(specs: Sequence[InputSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    inputs = {}
    for spec in specs:
        if spec.dtype.kind == "f":
            array = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            array = rng.integers(0, 2, spec.shape).astype(bool)
        else:
            high = 256 if spec.dtype.itemsize == 1 and spec.dtype.kind == "u" else 100
            array = rng.integers(0, high, spec.shape).astype(spec.dtype)
        inputs[spec.name] = array
    return inputs


def oip_body(inputs: dict[str, np.ndarray]) -> bytes:
    """An Open Inference Protocol JSON request."""
    from streams.serving.oip import dtype_to_datatype

    tensors = [{"name": name, "shape": list(a.shape), "datatype": dtype_to_datatype(a.dtype),
                "data": a.ravel().tolist()} for name, a in inputs.items()]
    return orjson.dumps({"inputs": tensors})


# -- targets -----------------------------------------------------------------------------------


class BridgeTarget:
    """POST /v2/models/{model}[/versions/{v}]/infer with JSON tensors; the input signature from
    the bridge's model metadata."""

    def __init__(self, url: str, model: str, *, version: str | None = None, timeout: float = 10.0,
                 shapes: dict | None = None, api_key: str | None = None, token: str | None = None,
                 max_connections: int = DEFAULT_MAX_INFLIGHT, seed: int = 0) -> None:
        base = f"{url.rstrip('/')}/v2/models/{model}" + (f"/versions/{version}" if version else "")
        self.metadata_url, self.infer_url = base, f"{base}/infer"
        self.timeout, self.shapes, self.seed = timeout, shapes, seed
        self.max_connections = max_connections
        self.headers = {"Content-Type": "application/json", "X-Inferstream-Timeout": f"{timeout:g}"}
        if api_key:
            self.headers["X-API-Key"] = api_key
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.specs: list[InputSpec] = []
        self._bodies: list[bytes] = []

    async def __aenter__(self) -> BridgeTarget:
        import aiohttp

        from streams.serving.oip import datatype_to_dtype

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout + 0.5),
            connector=aiohttp.TCPConnector(limit=self.max_connections),
        )
        try:
            auth = {k: v for k, v in self.headers.items() if k in ("X-API-Key", "Authorization")}
            async with self._session.get(self.metadata_url, headers=auth,
                                         timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status != 200:
                    raise RuntimeError(f"GET {self.metadata_url}: {response.status} {await response.text()}")
                metadata = await response.json()
            signature = [(t["name"], datatype_to_dtype(t["datatype"]), t["shape"]) for t in metadata["inputs"]]
            self.specs = resolve_specs(signature, self.shapes)
            rng = np.random.default_rng(self.seed)
            self._bodies = [oip_body(random_inputs(self.specs, rng)) for _ in range(_POOL_SIZE)]
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def send(self, index: int) -> Reply:
        import aiohttp

        try:
            async with self._session.post(self.infer_url, data=self._bodies[index % len(self._bodies)],
                                          headers=self.headers) as response:
                body = await response.read()
                if response.status == 200:
                    return Reply(OK)
                status = response.status
        except aiohttp.ClientError as exc:
            return Reply(ERROR, type(exc).__name__)
        try:
            code = orjson.loads(body).get("code")
        except (orjson.JSONDecodeError, AttributeError):
            code = None
        if code == "DEADLINE_EXCEEDED":
            return Reply(TIMEOUT)
        return Reply(ERROR, code or f"HTTP_{status}")


class KafkaTarget:
    """Request events on the requests topic through `InferenceClient`, replies awaited on its
    reply topic; the input signature from the settings' model repository (as `inferstream infer`)."""

    def __init__(self, settings, model: str, *, version: str | None = None, timeout: float = 10.0,
                 shapes: dict | None = None, api_key: str | None = None, token: str | None = None,
                 seed: int = 0) -> None:
        from topics.events import Credentials

        self.settings, self.model, self.version, self.timeout = settings, model, version, timeout
        self.credentials = (Credentials(api_key=api_key, authorization=f"Bearer {token}" if token else None)
                            if api_key or token else None)
        from streams.registry.records import ModelRegistry

        info = ModelRegistry.load(settings.model_repository).resolve(model, version)
        self.specs = resolve_specs([(t.name, t.dtype, t.shape) for t in info.inputs], shapes)
        rng = np.random.default_rng(seed)
        self._inputs = [random_inputs(self.specs, rng) for _ in range(_POOL_SIZE)]

    async def __aenter__(self) -> KafkaTarget:
        from streams.client import InferenceClient

        self.client = InferenceClient(self.settings)
        await self.client.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.stop()

    async def send(self, index: int) -> Reply:
        from streams.client import ReplyTimeout, UpstreamUnavailable

        inputs = self._inputs[index % len(self._inputs)]
        request = self.client.request(self.model, version=self.version, timeout=self.timeout,
                                      credentials=self.credentials)
        try:
            result = await self.client.wait(request, await self.client.send(request, inputs))
        except ReplyTimeout:
            return Reply(TIMEOUT, request_id=request.request_id)
        except UpstreamUnavailable:
            return Reply(ERROR, "UNAVAILABLE", request.request_id)
        error = result.header.error
        if error is None:
            return Reply(OK, request_id=request.request_id)
        if error.code == "DEADLINE_EXCEEDED":
            return Reply(TIMEOUT, request_id=request.request_id)
        return Reply(ERROR, str(error.code), request.request_id)


# -- one run -----------------------------------------------------------------------------------


@dataclass
class LoadRun:
    summary: dict[str, Any]
    attempts: list[Attempt]  # the counted requests, in schedule order


async def run(driver: BridgeTarget | KafkaTarget, /, *, rate: float, duration: float, warmup: float = 0.0,
              max_inflight: int | None = DEFAULT_MAX_INFLIGHT, timeout: float = 10.0,
              progress: Callable[[Tally], None] | None = None, every_s: float = 1.0, **about: Any) -> LoadRun:
    """Set up the target, drive it on the open-loop schedule, and summarize; `about` (target,
    model, url, ...) is copied into the summary. `progress` is called every `every_s` seconds
    while the requests run, with the counts so far."""
    slots = schedule(rate, duration, warmup)
    async with driver:
        tally = Tally()

        async def report() -> None:
            while progress is not None:
                await asyncio.sleep(every_s)
                progress(tally)

        reporter = asyncio.create_task(report())
        try:
            attempts = await run_load(driver.send, slots, max_inflight=max_inflight, timeout=timeout, tally=tally)
        finally:
            reporter.cancel()
    inputs = {s.name: f"{s.dtype.name}{list(s.shape)}" for s in driver.specs}
    summary = summarize(attempts, rate, duration, **about, warmup_s=warmup, max_inflight=max_inflight,
                        timeout_s=timeout, inputs=inputs)
    return LoadRun(summary, attempts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def summary_table(summary: dict[str, Any]):
    """The summary as a rich table."""
    from rich.table import Table

    where = summary.get("url") or summary.get("target", "")
    table = Table("figure", "value", title=f"inferstream load: {summary.get('model', '')} via {where}")
    latency = summary["latency_ms"]
    errors = ", ".join(f"{code} {n}" for code, n in summary["errors"].items()) or "0"
    rows = [
        ("offered rate", f"{summary['offered_rate']:,.1f} req/s ({summary['scheduled']} over "
                         f"{summary['duration_s']:g} s, warm-up {summary.get('warmup_s', 0):g} s)"),
        ("achieved throughput", f"{summary['achieved_rate']:,.1f} ok/s (over {summary['elapsed_s']:.2f} s)"),
        ("sent", str(summary["sent"])),
        ("ok", str(summary["ok"])),
        ("errors", errors),
        ("timeouts", str(summary["timeouts"])),
        ("dropped", f"{summary['dropped']} (max inflight {summary.get('max_inflight')})"),
        *((f"latency {k} ms", _ms(v)) for k, v in latency.items()),
        ("max send lag ms", _ms(summary["max_send_lag_ms"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
