"""`inferstream load` on the real stack: open-loop load through the bridge (its infer and classify
routes) and through Kafka, every request answered and stored; the command itself, with its JSON
figures and thresholds; and a load on a bridge that is not there, which fails its thresholds."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import skimage.data
from support.bridge import until_answering
from support.cli_process import run_cli
from support.waiting import assert_stays, wait_for

from infra.local.harness import wait_ready
from infra.local.stack import free_port
from streams.client import InferenceClient
from streams.ops import load

pytestmark = pytest.mark.integration
RATE, SECONDS = 50, 3
EXPECTED = RATE * SECONDS
CHELSEA = Path(skimage.data.__file__).parent / "chelsea.png"


async def stored_ok(settings, expect: int, *, since: datetime | None = None, request_ids: list[str] | None = None,
                    timeout: float = 60.0) -> int:
    """Ok rows in the results table (created since `since`, or with these ids), polled until
    `expect` are there (the sink is asynchronous), then once more after a pause: no extra rows."""
    if request_ids is not None:
        query, arg = "SELECT count(*) FROM inference_results WHERE status = 'ok' AND request_id = ANY($1::text[])", \
            request_ids
    else:
        query, arg = "SELECT count(*) FROM inference_results WHERE status = 'ok' AND created_at >= $1", since
    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    try:
        count = await wait_for(lambda: conn.fetchval(query, arg), timeout=timeout, interval=0.5,
                               until=lambda n: n >= expect, what=f"{expect} ok rows stored")

        async def no_more() -> bool:
            return await conn.fetchval(query, arg) == count

        await assert_stays(no_more, for_s=1.0, interval=0.25, what=f"no ok rows beyond the {count} stored")
        return count
    finally:
        await conn.close()


async def run_command(settings, json_path: Path, *args: str, timeout: float = 90.0) -> tuple[dict, str]:
    """`inferstream load ... --json PATH` as a process with the test's settings; its figures and output."""
    out = (await run_cli("load", *args, "--json", str(json_path), settings=settings, timeout=timeout)).output
    assert "achieved throughput" in out
    return json.loads(json_path.read_text()), out


def assert_all_ok(summary: dict, expected: int) -> None:
    assert summary["scheduled"] == expected, summary
    assert (summary["sent"], summary["ok"]) == (expected, expected), summary
    assert (summary["error_count"], summary["timeouts"], summary["dropped"]) == (0, 0, 0), summary
    assert summary["latency_ms"]["p50"] is not None and summary["latency_ms"]["max"] < 10_000


async def test_load_through_the_bridge(start_worker, start_bridge, settings, tmp_path):
    start_worker()
    bridge = await start_bridge()
    async with aiohttp.ClientSession() as session:
        await until_answering(session, bridge.url)
    since = datetime.now(UTC)
    done = await load.run(load.BridgeTarget(bridge.url, "tiny", timeout=10), rate=RATE, duration=SECONDS,
                          timeout=10, target="bridge", model="tiny")
    assert_all_ok(done.summary, EXPECTED)
    assert done.summary["inputs"] == {"x": "float32[1, 16]"}  # from the bridge's model metadata
    assert await stored_ok(settings, EXPECTED, since=since) == EXPECTED

    figures, out = await run_command(settings, tmp_path / "bridge.json", "--target", "bridge", "--url", bridge.url,
                                     "--rate", "20", "--duration", "3", "--warmup", "0.5", "--timeout", "10",
                                     "--max-error-rate", "0", "--p99-ms", "10000", "--min-rate", "5")
    assert_all_ok(figures, 60)
    # A line of counts a second while it runs, before the figures.
    before_summary = out[:out.index("achieved throughput")]
    progress = [line for line in before_summary.splitlines() if " sent " in line and " answered " in line]
    assert len(progress) >= 2, out
    assert figures["target"] == "bridge" and figures["offered_rate"] == pytest.approx(20)
    assert [(v["threshold"], v["passed"]) for v in figures["thresholds"]] == [
        ("error rate", True), ("latency p99 ms", True), ("achieved ok/s", True)], out
    assert "thresholds broken" not in out

    # The classify route, one photo, in stages: 0 -> 6/s over 1 s, 6/s for 1 s, down to 0: 3 + 6 + 3 requests.
    figures, out = await run_command(settings, tmp_path / "classify.json", "--target", "classify", "--url",
                                     bridge.url, "--model", "efficientnet-lite0", "--image", str(CHELSEA),
                                     "--stages", "1s:6,1s:6,1s:0", "--timeout", "10", "--max-error-rate", "0")
    assert_all_ok(figures, 12)
    assert figures["target"] == "classify" and figures["stages"] == [[1, 6], [1, 6], [1, 0]]
    assert figures["thresholds"][0]["passed"], out


async def test_load_on_an_unreachable_bridge_fails_its_error_threshold(tmp_path):
    """Nothing listens on the port: every request fails, the error-rate threshold breaks, exit 1."""
    url = f"http://127.0.0.1:{free_port()}"
    done = await run_cli("load", "--url", url, "--rate", "20", "--duration", "1", "--timeout", "2",
                         "--max-error-rate", "0", "--json", str(tmp_path / "figures.json"), expect=1)
    assert "error: thresholds broken: error rate 1 (limit <= 0): FAIL" in done.output, done.output
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert (figures["scheduled"], figures["ok"], figures["error_rate"]) == (20, 0, 1.0), figures
    assert set(figures["errors"]) == {"ClientConnectorError"}, figures


async def test_load_through_kafka(start_worker, settings, tmp_path):
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
    done = await load.run(load.KafkaTarget(settings, "tiny", timeout=10), rate=RATE, duration=SECONDS,
                          timeout=10, target="kafka", model="tiny")
    assert_all_ok(done.summary, EXPECTED)
    ids = [o.request_id for o in done.attempts]
    assert len(set(ids)) == EXPECTED and None not in ids
    assert await stored_ok(settings, EXPECTED, request_ids=ids) == EXPECTED

    figures, _ = await run_command(settings, tmp_path / "kafka.json", "--target", "kafka", "--rate", "20",
                                "--duration", "2", "--shape", "x=2,16", "--timeout", "10")
    assert_all_ok(figures, 40)
    assert figures["target"] == "kafka" and figures["inputs"] == {"x": "float32[2, 16]"}
