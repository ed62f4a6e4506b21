"""The load generator's pure parts: schedules (constant and staged), in-flight bound, figures;
and its dispatcher on fake targets (no network)."""

import asyncio

import numpy as np
import orjson
import pytest
from rich.console import Console
from support.virtual_time import run_virtual

from streams.ops.load import (
    DROPPED,
    ERROR,
    OK,
    TIMEOUT,
    Attempt,
    InflightGate,
    InputSpec,
    Reply,
    Stage,
    oip_body,
    parse_shapes,
    parse_stages,
    percentiles,
    random_inputs,
    resolve_specs,
    run,
    run_load,
    schedule,
    staged_schedule,
    summarize,
    summary_table,
)


def test_percentiles_on_known_data():
    figures = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms, shuffled order irrelevant
    assert figures["p50"] == pytest.approx(0.0505)
    assert figures["p90"] == pytest.approx(0.0901)
    assert figures["p95"] == pytest.approx(0.09505)
    assert figures["p99"] == pytest.approx(0.09901)
    assert figures["max"] == pytest.approx(0.1)
    assert percentiles([0.25]) == {"p50": 0.25, "p90": 0.25, "p95": 0.25, "p99": 0.25, "max": 0.25}
    assert percentiles([]) == {"p50": None, "p90": None, "p95": None, "p99": None, "max": None}


def test_summary_counts_and_latency_of_ok_requests_only():
    ok = [Attempt(due=i * 0.01, started=i * 0.01, done=i * 0.01 + (i + 1) / 1000, status=OK) for i in range(100)]
    others = [
        Attempt(1.0, 1.0, 1.5, ERROR, "RATE_LIMITED"),
        Attempt(1.01, 1.01, 1.02, ERROR, "RATE_LIMITED"),
        Attempt(1.02, 1.02, 1.03, ERROR, "ClientConnectorError"),
        Attempt(1.03, 1.03, 9.0, TIMEOUT),
        Attempt(1.04, None, 1.04, DROPPED),
    ]
    summary = summarize(ok + others, rate=100, duration=1.05, target="bridge", model="tiny")
    assert summary["target"] == "bridge" and summary["model"] == "tiny"
    assert (summary["scheduled"], summary["sent"], summary["ok"]) == (105, 104, 100)
    assert summary["errors"] == {"ClientConnectorError": 1, "RATE_LIMITED": 2}
    assert (summary["error_count"], summary["timeouts"], summary["dropped"]) == (3, 1, 1)
    assert summary["error_rate"] == pytest.approx(5 / 105)  # errors, the timeout and the dropped one
    assert summary["offered_rate"] == pytest.approx(100)
    # The timeout's answer came last, at 9.0 s: throughput counts until then.
    assert summary["elapsed_s"] == pytest.approx(9.0)
    assert summary["achieved_rate"] == pytest.approx(100 / 9.0)
    latency = summary["latency_ms"]  # 1..100 ms: the failures' times are not in it
    assert (latency["p50"], latency["p90"], latency["p95"], latency["p99"], latency["max"]) == pytest.approx(
        (50.5, 90.1, 95.05, 99.01, 100))
    assert summary["max_send_lag_ms"] == pytest.approx(0)


def test_throughput_is_over_the_window_when_replies_keep_up():
    attempts = [Attempt(i / 10, i / 10, i / 10 + 0.001, OK) for i in range(10)]
    summary = summarize(attempts, rate=10, duration=1.0)
    assert summary["elapsed_s"] == 1.0 and summary["achieved_rate"] == pytest.approx(10)
    empty = summarize([], rate=10, duration=2.0)
    assert (empty["ok"], empty["achieved_rate"], empty["latency_ms"]["p99"], empty["error_rate"]) == (0, 0, None, None)
    assert summary["error_rate"] == 0


def test_schedule_is_on_the_clock_with_warmup_first():
    slots = schedule(rate=50, duration=3)
    assert len(slots) == 150 and all(s.counted for s in slots)
    assert [s.due for s in slots] == pytest.approx([i / 50 for i in range(150)])
    warm = schedule(rate=4, duration=1, warmup=0.5)
    assert [(s.due, s.counted) for s in warm] == [
        (0.0, False), (0.25, False), (0.5, True), (0.75, True), (1.0, True), (1.25, True)]
    assert len(schedule(rate=0.5, duration=10)) == 5
    for bad in ({"rate": 0, "duration": 1}, {"rate": 1, "duration": 0}, {"rate": 1, "duration": 1, "warmup": -1}):
        with pytest.raises(ValueError):
            schedule(**bad)


def test_stages_parse_like_k6():
    assert parse_stages("10s:50,30s:50,10s:0") == [Stage(10, 50), Stage(30, 50), Stage(10, 0)]
    assert parse_stages(" 500ms:10, 1m:5.5,2:3,1h:0") == [Stage(0.5, 10), Stage(60, 5.5), Stage(2, 3), Stage(3600, 0)]
    for bad in ("", "10s", "10s:", "x:1", "10s:-1", "10d:5", "10s:50;30s:50"):
        with pytest.raises(ValueError, match="--stages"):
            parse_stages(bad)


def test_stages_ramp_up_hold_and_ramp_down():
    """The rate goes linearly from stage to stage: request i is due when the rate's integral
    reaches i (0 -> 50/s over 10 s: 2.5 t^2 requests by time t)."""
    slots = staged_schedule(parse_stages("10s:50,30s:50,10s:0"))
    due = [s.due for s in slots]
    assert len(slots) == 250 + 1500 + 250 and all(s.counted for s in slots)
    assert due == sorted(due) and due[0] == 0 and due[-1] < 50
    assert due[10] == pytest.approx(2.0) and due[160] == pytest.approx(8.0)  # sqrt(i / 2.5)
    assert due[250:1750] == pytest.approx([10 + k / 50 for k in range(1500)])  # the hold: every 20 ms
    # The ramp down mirrors the ramp up: as many requests, ever further apart.
    assert [50 - d for d in reversed(due[1751:])] == pytest.approx(due[1:250])

    def per_second(times):
        return [sum(1 for t in times if second <= t < second + 1) for second in range(50)]

    counts = per_second(due)
    assert counts[:3] == [3, 7, 13] and counts[9] == 47 and set(counts[10:40]) == {50} and counts[-1] == 2


def test_stages_from_a_start_rate_pauses_and_refusals():
    # A constant stage from its own rate is the --rate/--duration shorthand.
    assert staged_schedule([Stage(2, 4)], start_rate=4) == schedule(rate=4, duration=2)
    # Ramp down to 0, hold 0 (a pause: nothing due), ramp up again.
    due = [s.due for s in staged_schedule([Stage(1, 10), Stage(1, 0), Stage(1, 0), Stage(1, 10)])]
    assert len(due) == 15 and not [t for t in due if 2 <= t < 3]
    assert sum(1 for t in due if t < 1) == 5 and sum(1 for t in due if t >= 3) == 5
    for bad in ([], [Stage(0, 5)], [Stage(1, -5)]):
        with pytest.raises(ValueError):
            staged_schedule(bad)
    with pytest.raises(ValueError):
        staged_schedule([Stage(1, 5)], start_rate=-1)


def test_inflight_gate_refuses_over_its_limit():
    gate = InflightGate(2)
    assert gate.try_acquire() and gate.try_acquire()
    assert not gate.try_acquire()
    gate.release()
    assert gate.try_acquire() and gate.peak == 2
    unbounded = InflightGate(None)
    assert all(unbounded.try_acquire() for _ in range(10_000))
    with pytest.raises(ValueError):
        InflightGate(0)


async def on_the_loop_clock(send, slots, **options) -> list[Attempt]:
    """`run_load` timed by the loop's clock (a virtual one under `run_virtual`)."""
    return await run_load(send, slots, clock=asyncio.get_running_loop().time, **options)


def test_open_loop_starts_on_schedule_while_replies_are_slow():
    async def slow(index: int) -> Reply:
        await asyncio.sleep(0.3)
        return Reply(OK)

    attempts = run_virtual(on_the_loop_clock(slow, schedule(rate=100, duration=0.5), max_inflight=None, timeout=5))
    assert len(attempts) == 50 and all(o.status == OK for o in attempts)
    # Every request started at its due time, not after the previous reply: the last one was
    # answered 0.3 s after it was due (a closed loop would have taken 15 s).
    assert [o.started for o in attempts] == pytest.approx([o.due for o in attempts])
    assert [o.latency_s for o in attempts] == pytest.approx([0.3] * 50)
    assert attempts[-1].done == pytest.approx(0.49 + 0.3)


def test_staged_requests_start_on_the_ramps_schedule():
    async def instant(index: int) -> Reply:
        return Reply(OK)

    # 0 -> 10/s over 2 s, 10/s for 1 s, 10 -> 0/s over 2 s: 10 + 10 + 10 requests.
    slots = staged_schedule([Stage(2, 10), Stage(1, 10), Stage(2, 0)])
    attempts = run_virtual(on_the_loop_clock(instant, slots, max_inflight=None, timeout=5))
    assert [o.started for o in attempts] == pytest.approx([s.due for s in slots])
    started = [round(o.started, 9) for o in attempts]  # the loop's clock sums in floats
    assert [sum(1 for t in started if second <= t < second + 1) for second in range(5)] == [3, 7, 10, 8, 2]


def test_run_takes_stages_or_a_rate_not_both():
    class Unused:
        specs = ()

    for plan in ({"stages": [Stage(1, 5)], "rate": 5.0}, {"stages": [Stage(1, 5)], "warmup": 1.0}, {"rate": 5.0}):
        with pytest.raises(ValueError):
            asyncio.run(run(Unused(), **plan))


def test_requests_over_max_inflight_are_dropped():
    async def stuck(index: int) -> Reply:
        await asyncio.sleep(1.0)
        return Reply(OK)

    attempts = run_virtual(on_the_loop_clock(stuck, schedule(rate=100, duration=0.5), max_inflight=10, timeout=5))
    statuses = [o.status for o in attempts]
    assert statuses[:10] == [OK] * 10 and statuses[10:] == [DROPPED] * 40
    summary = summarize(attempts, rate=100, duration=0.5)
    assert (summary["sent"], summary["ok"], summary["dropped"]) == (10, 10, 40)


def test_timeouts_errors_and_warmup():
    async def mixed(index: int) -> Reply:
        if index % 4 == 1:
            await asyncio.sleep(5)  # past the bound: a timeout
        if index % 4 == 2:
            raise ConnectionResetError("gone")
        if index % 4 == 3:
            return Reply(ERROR, "UNAUTHENTICATED")
        return Reply(OK, request_id=f"r{index}")

    attempts = run_virtual(on_the_loop_clock(mixed, schedule(rate=40, duration=0.2, warmup=0.1), timeout=0.2,
                                             grace=0))
    # The 4 warm-up requests (indices 0-3) are not counted; the counted ones are 4-11.
    assert [(o.status, o.code) for o in attempts] == [
        (OK, None), (TIMEOUT, None), (ERROR, "ConnectionResetError"), (ERROR, "UNAUTHENTICATED")] * 2
    assert [o.request_id for o in attempts if o.status == OK] == ["r4", "r8"]
    assert all(o.due >= 0.1 for o in attempts)
    # A timeout ends at its bound, not when the send would have answered.
    assert [o.done - o.due for o in attempts if o.status == TIMEOUT] == pytest.approx([0.2, 0.2])


def test_input_specs_shapes_and_random_data():
    assert parse_shapes(["1,16"]) == {None: (1, 16)}
    assert parse_shapes(["x=4,16", "mask=1x3"]) == {"x": (4, 16), "mask": (1, 3)}
    for bad in ("x=", "x=a,b", "x=-1,2"):
        with pytest.raises(ValueError):
            parse_shapes([bad])
    signature = [("x", "float32", [-1, 16]), ("ids", "int64", [-1, 3]), ("flag", "bool", [1])]
    specs = resolve_specs(signature)
    assert [(s.name, s.dtype.name, s.shape) for s in specs] == [
        ("x", "float32", (1, 16)), ("ids", "int64", (1, 3)), ("flag", "bool", (1,))]
    assert resolve_specs(signature, {"x": (8, 16)})[0].shape == (8, 16)
    assert resolve_specs(signature[:1], {None: (2, 16)})[0].shape == (2, 16)
    with pytest.raises(ValueError, match="nope"):
        resolve_specs(signature, {"nope": (1,)})
    inputs = random_inputs(specs + [InputSpec("px", np.dtype("uint8"), (2, 2))], np.random.default_rng(0))
    assert {n: (a.dtype.name, a.shape) for n, a in inputs.items()} == {
        "x": ("float32", (1, 16)), "ids": ("int64", (1, 3)), "flag": ("bool", (1,)), "px": ("uint8", (2, 2))}
    body = orjson.loads(oip_body({"x": inputs["x"], "flag": inputs["flag"]}))
    assert body["inputs"][0]["datatype"] == "FP32" and body["inputs"][0]["shape"] == [1, 16]
    assert len(body["inputs"][0]["data"]) == 16 and body["inputs"][1]["datatype"] == "BOOL"


def test_summary_table_renders_every_figure():
    attempts = [Attempt(0.0, 0.0, 0.004, OK), Attempt(0.1, 0.1, 0.2, ERROR, "RATE_LIMITED"),
                Attempt(0.2, None, 0.2, DROPPED)]
    console = Console(record=True, width=120)
    console.print(summary_table(summarize(attempts, rate=10, duration=0.3, model="tiny", target="kafka")))
    text = console.export_text()
    for figure in ("offered rate", "achieved throughput", "RATE_LIMITED 1", "dropped", "latency p95 ms",
                   "latency p99 ms", "latency max ms", "4.0", "error rate", "66.67%"):
        assert figure in text, text


def test_summary_table_shows_the_stages():
    summary = summarize([Attempt(0.0, 0.0, 0.004, OK)], rate=50, duration=50, stages=[[10, 50], [30, 50], [10, 0]])
    console = Console(record=True, width=120)
    console.print(summary_table(summary))
    assert "10 s to 50/s, 30 s to 50/s, 10 s to 0/s" in console.export_text()
