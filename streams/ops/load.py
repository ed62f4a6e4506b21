"""`inferstream load`: an open-loop load generator for the HTTP bridge or the Kafka ingress.

Open loop: request i of the measured window is due when the rate's integral since the start
reaches i (at a constant rate, `warmup + i / rate` seconds after the start) and is started at
that time whether or not earlier requests have answered. A slow system therefore shows as
latency, timeouts and errors, never as a lower offered rate (no coordinated omission); latency
counts from the due time, so a client that falls behind its schedule shows too. `max_inflight`
bounds the requests in flight: one that is due while the bound is reached is not started and
counts as dropped.

The rate is constant (`schedule`) or follows stages (`staged_schedule`): like k6's
ramping-arrival-rate, each stage goes linearly from the previous stage's target rate (at first
the start rate) to its own over its duration, so `10s:50,30s:50,10s:0` ramps up, holds, ramps down.

The pieces: the schedules (the send times), `InflightGate` (the bound), `run_load` (the
dispatcher, given any async `send`), `summarize` / `percentiles` (pure figures from the
attempts), `evaluate` (the thresholds against the figures), the targets (`BridgeTarget`,
`ClassifyTarget`, `KafkaTarget`) and `summary_table` / `verdict_table` for the CLI.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

OK, ERROR, TIMEOUT, DROPPED = "ok", "error", "timeout", "dropped"
DEFAULT_MAX_INFLIGHT = 1000
PERCENTILES = (50, 90, 95, 99)
_START_LEAD_S = 0.05  # time to get going before the first request is due
_POOL_SIZE = 16  # distinct random payloads, cycled


# -- schedule and bound -------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    due: float  # seconds after the start
    counted: bool  # False: a warm-up request


@dataclass(frozen=True)
class Stage:
    duration: float  # seconds
    target: float  # requests per second at the stage's end


_STAGE = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h)?:(\d+(?:\.\d*)?)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_stages(spec: str) -> list[Stage]:
    """`--stages` value: comma-separated DURATION:TARGET, a duration in ms, s (the default), m or
    h, a target in requests per second: `10s:50,30s:50,10s:0`."""
    stages = []
    for part in spec.split(","):
        match = _STAGE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"--stages takes DURATION:RATE,... (e.g. 10s:50,30s:50,10s:0), got {part.strip()!r}")
        seconds, unit, target = match.groups()
        stages.append(Stage(float(seconds) * _UNIT_S[unit], float(target)))
    return stages


def _due_in_stage(n: float, start_rate: float, stage: Stage) -> float:
    """Seconds into a stage when `n` requests of it are due: the rate goes linearly from
    `start_rate` to the stage's target, so n(t) = r0 t + (r1 - r0) t^2 / 2d, solved for t in the
    form that stays exact when r0 == r1 and when r0 is 0."""
    if n <= 0:
        return 0.0
    r0, r1 = start_rate, stage.target
    if r0 == r1:
        return n / r0
    return 2 * n / (r0 + math.sqrt(max(r0 * r0 + 2 * (r1 - r0) * n / stage.duration, 0.0)))


def staged_schedule(stages: Sequence[Stage], start_rate: float = 0.0) -> list[Slot]:
    """Open-loop send times, all counted, for a rate that follows `stages` from `start_rate`:
    request i is due when the rate's integral reaches i; as many requests as the integral over
    all stages (rounded down)."""
    if not stages:
        raise ValueError("give at least one stage")
    if start_rate < 0 or any(s.target < 0 for s in stages):
        raise ValueError("rates must not be negative")
    if any(s.duration <= 0 for s in stages):
        raise ValueError("stage durations must be positive")
    slots: list[Slot] = []
    began, before, rate = 0.0, 0.0, start_rate  # the stage's start time, requests due before it, start rate
    index = 0
    for stage in stages:
        after = before + (rate + stage.target) * stage.duration / 2
        while index < math.floor(after + 1e-9):
            slots.append(Slot(began + min(_due_in_stage(index - before, rate, stage), stage.duration), True))
            index += 1
        began, before, rate = began + stage.duration, after, stage.target
    return slots


def schedule(rate: float, duration: float, warmup: float = 0.0) -> list[Slot]:
    """Open-loop send times: `rate` per second for `warmup` seconds (not counted), then for
    `duration` seconds (counted). Times depend only on the clock, never on replies."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if duration <= 0 or warmup < 0:
        raise ValueError("duration must be positive and warmup not negative")
    warm = math.floor(rate * warmup + 1e-9)
    slots = [Slot(i / rate, False) for i in range(warm)]
    slots += [Slot(warmup + s.due, True) for s in staged_schedule([Stage(duration, rate)], start_rate=rate)]
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
    replies per second, over the window or, when replies came in after it, until the last one;
    error_rate: the share of the scheduled requests not answered ok (errors, timeouts, dropped;
    None when none was scheduled). Latency percentiles are in ms, of ok requests only.
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
        "error_rate": (len(attempts) - len(ok)) / len(attempts) if attempts else None,
        "elapsed_s": elapsed,
        "latency_ms": {k: None if v is None else v * 1000 for k, v in
                       percentiles([o.latency_s for o in ok]).items()},
        "max_send_lag_ms": max(lags) * 1000 if lags else None,
    }


# -- thresholds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """Limits a run must meet (None: not checked), as k6's thresholds: the share of requests not
    answered ok, latency p95 and p99 of the ok ones, and the achieved ok/s."""

    max_error_rate: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    min_rate: float | None = None


@dataclass(frozen=True)
class Verdict:
    threshold: str  # what is measured
    limit: str  # e.g. "<= 0.01"
    measured: float | None  # None: nothing to measure (no request, no ok reply), which fails
    passed: bool

    def line(self) -> str:
        measured = "-" if self.measured is None else f"{self.measured:.4g}"
        return f"{self.threshold} {measured} (limit {self.limit}): {'PASS' if self.passed else 'FAIL'}"


def evaluate(summary: dict[str, Any], thresholds: Thresholds) -> list[Verdict]:
    """Each set threshold against the run's figures, in a fixed order."""
    checks: list[tuple[str, float | None, str, float | None]] = [
        ("error rate", thresholds.max_error_rate, "<=", summary["error_rate"]),
        ("latency p95 ms", thresholds.p95_ms, "<=", summary["latency_ms"]["p95"]),
        ("latency p99 ms", thresholds.p99_ms, "<=", summary["latency_ms"]["p99"]),
        ("achieved ok/s", thresholds.min_rate, ">=", summary["achieved_rate"]),
    ]
    verdicts = []
    for name, limit, op, measured in checks:
        if limit is None:
            continue
        passed = measured is not None and (measured <= limit if op == "<=" else measured >= limit)
        verdicts.append(Verdict(name, f"{op} {limit:g}", measured, passed))
    return verdicts


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


class _HttpTarget:
    """What the bridge's targets share: the client session, the caller's headers, and how a reply
    reads (200: ok; DEADLINE_EXCEEDED: a timeout; else an error by its code or HTTP status)."""

    def __init__(self, *, content_type: str, timeout: float, api_key: str | None, token: str | None,
                 max_connections: int) -> None:
        self.timeout, self.max_connections = timeout, max_connections
        self.auth = {}
        if api_key:
            self.auth["X-API-Key"] = api_key
        if token:
            self.auth["Authorization"] = f"Bearer {token}"
        self.headers = {"Content-Type": content_type, "X-Inferstream-Timeout": f"{timeout:g}", **self.auth}
        self.specs: list[InputSpec] = []

    async def __aenter__(self) -> Any:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout + 0.5),
            connector=aiohttp.TCPConnector(limit=self.max_connections),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def post(self, url: str, body: bytes) -> Reply:
        import aiohttp

        try:
            async with self._session.post(url, data=body, headers=self.headers) as response:
                answer = await response.read()
                if response.status == 200:
                    return Reply(OK)
                status = response.status
        except aiohttp.ClientError as exc:
            return Reply(ERROR, type(exc).__name__)
        try:
            code = orjson.loads(answer).get("code")
        except (orjson.JSONDecodeError, AttributeError):
            code = None
        if code == "DEADLINE_EXCEEDED":
            return Reply(TIMEOUT)
        return Reply(ERROR, code or f"HTTP_{status}")


class BridgeTarget(_HttpTarget):
    """POST /v2/models/{model}[/versions/{v}]/infer with JSON tensors; the input signature from
    the bridge's model metadata. A bridge that cannot be reached at the start does not stop the
    run: each request asks for the metadata again first and counts as an error while that fails,
    so a load on a bridge that is down measures (and fails its thresholds) rather than refuses."""

    def __init__(self, url: str, model: str, *, version: str | None = None, timeout: float = 10.0,
                 shapes: dict | None = None, api_key: str | None = None, token: str | None = None,
                 max_connections: int = DEFAULT_MAX_INFLIGHT, seed: int = 0) -> None:
        super().__init__(content_type="application/json", timeout=timeout, api_key=api_key, token=token,
                         max_connections=max_connections)
        base = f"{url.rstrip('/')}/v2/models/{model}" + (f"/versions/{version}" if version else "")
        self.metadata_url, self.infer_url = base, f"{base}/infer"
        self.shapes, self.seed = shapes, seed
        self._bodies: list[bytes] = []

    async def __aenter__(self) -> BridgeTarget:
        import aiohttp

        await super().__aenter__()
        try:
            await self._prepare()
        except (aiohttp.ClientConnectionError, TimeoutError):
            pass  # not reachable (yet): `send` tries again
        except BaseException:
            await self._session.close()
            raise
        return self

    async def _prepare(self) -> None:
        """The input signature from the model metadata (an answer other than 200 is refused: a
        wrong model or credentials), and a pool of request bodies."""
        import aiohttp

        from streams.serving.oip import datatype_to_dtype

        async with self._session.get(self.metadata_url, headers=self.auth,
                                     timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {self.metadata_url}: {response.status} {await response.text()}")
            metadata = await response.json()
        signature = [(t["name"], datatype_to_dtype(t["datatype"]), t["shape"]) for t in metadata["inputs"]]
        self.specs = resolve_specs(signature, self.shapes)
        rng = np.random.default_rng(self.seed)
        self._bodies = [oip_body(random_inputs(self.specs, rng)) for _ in range(_POOL_SIZE)]

    async def send(self, index: int) -> Reply:
        import aiohttp

        if not self._bodies:
            try:
                await self._prepare()
            except aiohttp.ClientError as exc:
                return Reply(ERROR, type(exc).__name__)
        return await self.post(self.infer_url, self._bodies[index % len(self._bodies)])


class ClassifyTarget(_HttpTarget):
    """POST /v1/models/{model}/classify with the bytes of one image file, the same each time."""

    def __init__(self, url: str, model: str, image: bytes, *, content_type: str = "application/octet-stream",
                 timeout: float = 10.0, api_key: str | None = None, token: str | None = None,
                 max_connections: int = DEFAULT_MAX_INFLIGHT) -> None:
        super().__init__(content_type=content_type, timeout=timeout, api_key=api_key, token=token,
                         max_connections=max_connections)
        self.classify_url, self.image = f"{url.rstrip('/')}/v1/models/{model}/classify", image

    async def send(self, index: int) -> Reply:
        return await self.post(self.classify_url, self.image)


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


Target = BridgeTarget | ClassifyTarget | KafkaTarget


async def run(driver: Target, /, *, rate: float | None = None, duration: float | None = None,
              stages: Sequence[Stage] | None = None, warmup: float = 0.0,
              max_inflight: int | None = DEFAULT_MAX_INFLIGHT, timeout: float = 10.0,
              progress: Callable[[Tally], None] | None = None, every_s: float = 1.0, **about: Any) -> LoadRun:
    """Set up the target, drive it on the open-loop schedule (`rate` for `duration` seconds after
    `warmup`, or `stages` from 0 req/s), and summarize; `about` (target, model, url, ...) is
    copied into the summary. `progress` is called every `every_s` seconds while the requests
    run, with the counts so far."""
    if stages:
        if rate is not None or duration is not None or warmup:
            raise ValueError("give stages, or a rate and a duration (and warm-up), not both")
        slots = staged_schedule(stages)
        rate, duration = max(s.target for s in stages), sum(s.duration for s in stages)
        about["stages"] = [[s.duration, s.target] for s in stages]
    elif rate is None or duration is None:
        raise ValueError("give a rate and a duration, or stages")
    else:
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
        *([("stages", ", ".join(f"{d:g} s to {r:g}/s" for d, r in summary["stages"]))] if summary.get("stages")
          else []),
        ("achieved throughput", f"{summary['achieved_rate']:,.1f} ok/s (over {summary['elapsed_s']:.2f} s)"),
        ("sent", str(summary["sent"])),
        ("ok", str(summary["ok"])),
        ("errors", errors),
        ("timeouts", str(summary["timeouts"])),
        ("error rate", "-" if summary["error_rate"] is None
         else f"{summary['error_rate']:.2%} (not ok, dropped included)"),
        ("dropped", f"{summary['dropped']} (max inflight {summary.get('max_inflight')})"),
        *((f"latency {k} ms", _ms(v)) for k, v in latency.items()),
        ("max send lag ms", _ms(summary["max_send_lag_ms"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def verdict_table(verdicts: Sequence[Verdict]):
    """The thresholds, each with its limit, the measured value and PASS or FAIL, as a rich table."""
    from rich.table import Table

    table = Table("threshold", "limit", "measured", "result", title="thresholds")
    for v in verdicts:
        table.add_row(v.threshold, v.limit, "-" if v.measured is None else f"{v.measured:.4g}",
                      "[green]PASS[/green]" if v.passed else "[red]FAIL[/red]")
    return table
