"""Metrics, trace context, logs and OTLP export on real worker and bridge processes."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import defaultdict

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from support.bridge import oip_inputs
from support.metrics import Samples, scrape, summed, value
from support.topics import topic_records
from support.waiting import wait_for

from infra.local.harness import tiny_input, wait_ready
from infra.local.stack import free_port
from streams.client import InferenceClient
from topics import events
from topics.names import Topics

pytestmark = pytest.mark.integration
INFER = "/v2/models/{model}/infer"


def requests_at(samples: Samples, stage: str, outcome: str = "ok") -> float:
    return value(samples, "inferstream_requests_total", stage=stage, outcome=outcome)


async def settled(url: str, timeout: float = 30.0) -> Samples:
    """Metrics once nothing is in flight: no stage's count moved for a second (a readiness probe
    that timed out may still be answered, or rejected as late, after the one that got through)."""
    previous: tuple[float, ...] | None = None

    async def unchanged() -> Samples | None:
        nonlocal previous
        samples = await scrape(url)
        counts = tuple(requests_at(samples, stage, outcome) for stage in ("intake", "inference", "sink")
                       for outcome in ("ok", "rejected", "refused"))
        steady, previous = counts == previous, counts
        return samples if steady else None

    return await wait_for(unchanged, timeout=timeout, interval=1.0, what="the stage counts to settle")


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{secrets.token_hex(8)}-01"


async def infer_http(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None):
    body = {"inputs": oip_inputs(tiny_input()["x"])}
    async with session.post(f"{url}/v2/models/tiny/infer", json=body, headers=headers or {}) as response:
        await response.read()
        return response.status, response.headers


async def test_metrics_count_every_request_at_every_stage(start_worker, start_bridge, settings):
    metrics_port = free_port()
    worker = start_worker(metrics_port=metrics_port)
    bridge = await start_bridge()
    worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    sent_kafka, sent_http, bad = 200, 20, 3
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        before = await settled(worker_metrics)
        results = await asyncio.gather(*(client.infer("tiny", tiny_input(seed=i), timeout=60)
                                         for i in range(sent_kafka)))
        assert all(r.header.error is None for r in results)
        for _ in range(bad):
            await client.produce(Topics(settings.topic_prefix).requests, b"bad", b"not an event")
    async with aiohttp.ClientSession() as session:
        statuses = [(await infer_http(session, bridge.url))[0] for _ in range(sent_http)]
    assert statuses == [200] * sent_http
    sent = sent_kafka + sent_http

    after = await wait_for(lambda: scrape(worker_metrics), timeout=30, interval=0.3,
                           until=lambda samples: requests_at(samples, "sink") - requests_at(before, "sink") >= sent,
                           what=f"{sent} requests through the sink")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Completed requests at each stage equal the number sent.
    assert delta("inferstream_requests_total", stage="intake", outcome="ok") == sent
    assert delta("inferstream_requests_total", stage="inference", outcome="ok") == sent
    assert delta("inferstream_requests_total", stage="sink", outcome="ok") == sent
    assert delta("inferstream_requests_total", stage="intake", outcome="rejected") == bad
    assert delta("inferstream_dead_letters_total", stage="intake", reason="UNDECODABLE") == bad
    assert delta("inferstream_errors_total", stage="intake", code="UNDECODABLE") == bad
    # One latency observation per request and stage; batch sizes add up to the requests.
    for stage in ("queue_wait", "batch_formation", "end_to_end", "sink_delay"):
        assert delta("inferstream_latency_seconds_count", stage=stage, model="tiny") == sent, stage
    assert delta("inferstream_batch_size_sum", model="tiny", backend="onnxruntime") == sent
    batches = delta("inferstream_batch_size_count", model="tiny", backend="onnxruntime")
    assert 1 <= batches <= sent
    assert delta("inferstream_latency_seconds_count", stage="inference", model="tiny") == batches
    assert 0 < delta("inferstream_latency_seconds_sum", stage="end_to_end", model="tiny") < 60 * sent
    # Live state: breakers closed, no backend errors, the rate limiter's store answered.
    breakers = {dict(labels)["version"]: v for (name, labels), v in after.items()
                if name == "inferstream_breaker_state" and dict(labels)["model"] == "tiny"}
    assert breakers and set(breakers.values()) == {0}
    assert delta("inferstream_backend_errors_total", model="tiny", backend="onnxruntime") == 0
    assert ("inferstream_rate_limit_store_unavailable_total", frozenset()) in after

    # The consumer lag gauge covers the requests topic (refreshed every few seconds).
    requests_topic = Topics(settings.topic_prefix).requests
    await wait_for(lambda: scrape(worker_metrics), timeout=30, interval=0.5,
                   until=lambda samples: requests_topic in summed(samples, "inferstream_consumer_lag", by="topic"),
                   what="the consumer lag gauge of the requests topic")

    # The bridge counts its own requests.
    bridge_samples = await scrape(f"{bridge.url}/metrics")
    assert value(bridge_samples, "inferstream_bridge_requests_total", route=INFER, status="200") >= sent_http
    assert value(bridge_samples, "inferstream_bridge_request_seconds_count", route=INFER) >= sent_http


def log_records(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def stages_of(text: str, trace_id: str) -> set[str]:
    return {r["stage"] for r in log_records(text) if r.get("trace_id") == trace_id and "stage" in r}


async def test_trace_id_travels_to_the_reply_and_every_stage_log(start_worker, start_bridge, settings):
    worker = start_worker(log_requests=1)  # every trace logged: these two are not picked by chance
    bridge = await start_bridge(log_requests=1)
    kafka_trace, http_trace = secrets.token_hex(16), secrets.token_hex(16)
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        # Kafka ingress: a producer that sets the W3C header.
        request = client.request("tiny", timeout=30)
        waiter = await client.send(request, tiny_input(), headers=[("traceparent", traceparent(kafka_trace).encode())])
        result = await client.wait(request, waiter)
        assert result.header.error is None
        key = request.correlation_id.encode()
        (reply,) = [r for r in await topic_records(settings, client.reply_topic) if r.key == key]  # answered
        header = dict(reply.headers)["traceparent"].decode()
        assert header.split("-")[1] == kafka_trace

    # HTTP ingress: the bridge continues the caller's trace and answers with it.
    async with aiohttp.ClientSession() as session:
        status, headers = await infer_http(session, bridge.url, {"traceparent": traceparent(http_trace)})
    assert status == 200
    assert headers["traceparent"].split("-")[1] == http_trace

    want = {"intake", "inference", "sink"}
    await wait_for(lambda: want <= stages_of(worker.log(), kafka_trace) and want <= stages_of(worker.log(), http_trace),
                   timeout=30, interval=0.3, what="both traces logged at every stage")
    assert stages_of(worker.log(), kafka_trace) == want, worker.log()[-3000:]
    assert stages_of(worker.log(), http_trace) == want, worker.log()[-3000:]
    assert stages_of(bridge.log(), http_trace) == {"bridge"}
    lines = [r for r in log_records(worker.log()) if r.get("trace_id") == kafka_trace]
    assert {r["request_id"] for r in lines} == {request.request_id}
    assert all(r["service"] == "worker" and r["level"] == "INFO" for r in lines)
    for service in (worker, bridge):  # JSON lines only: no banner, spinner or plain text
        assert all(line.startswith("{") for line in service.log().splitlines() if line.strip()), service.log()[:2000]


async def test_logs_hold_no_credentials(start_worker, start_bridge, settings):
    worker = start_worker()
    bridge = await start_bridge()
    api_key = f"isk_{secrets.token_hex(4)}_{secrets.token_urlsafe(24)}"
    token = "eyJhbGciOiJIUzI1NiJ9." + secrets.token_urlsafe(30) + "." + secrets.token_urlsafe(20)
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        refused = await client.infer("tiny", tiny_input(), credentials=events.Credentials(api_key=api_key))
        assert refused.header.error.code.value == "UNAUTHENTICATED"
    async with aiohttp.ClientSession() as session:
        status, _ = await infer_http(session, bridge.url, {"Authorization": f"Bearer {token}"})
        assert status == 401
        status, _ = await infer_http(session, bridge.url, {"X-API-Key": api_key})
        assert status == 401
    refusals = await wait_for(lambda: sum(r.get("message") == "refused" for r in log_records(worker.log())),
                              timeout=20, interval=0.3, until=lambda count: count >= 3, what="three refusals logged")
    assert refusals == 3
    for text in (worker.log(), bridge.log()):
        assert api_key not in text and token not in text
        assert api_key.split("_")[2] not in text and token.split(".")[1] not in text


class OtlpReceiver:
    """A minimal OTLP/HTTP trace receiver: collects the spans posted to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list = []
        self.port = free_port()

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
            for scope in resource.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def test_spans_are_exported_over_otlp(start_worker, start_bridge, settings, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export within a fraction of a second
    async with OtlpReceiver() as receiver:
        endpoint = f"http://127.0.0.1:{receiver.port}"
        worker = start_worker(otlp_endpoint=endpoint)
        bridge = await start_bridge(otlp_endpoint=endpoint)
        async with InferenceClient(settings) as client:
            await wait_ready(client, worker)
        trace_id = secrets.token_hex(16)
        async with aiohttp.ClientSession() as session:
            status, _ = await infer_http(session, bridge.url, {"traceparent": traceparent(trace_id)})
        assert status == 200

        def ours() -> dict[str, list]:
            found = defaultdict(list)
            for service, span in receiver.spans:
                if span.trace_id.hex() == trace_id:
                    found[span.name].append((service, span))
            return found

        spans = await wait_for(ours, timeout=30, interval=0.3, until=lambda found: len(found) >= 4,
                               what="four spans of the trace exported")
        assert set(spans) == {f"POST {INFER}", "intake", "inference", "sink"}, list(spans)
        (bridge_service, http_span), = spans[f"POST {INFER}"]
        (_, intake), (_, inference), (_, sink) = spans["intake"][0], spans["inference"][0], spans["sink"][0]
        assert bridge_service == "inferstream-bridge" and spans["intake"][0][0] == "inferstream-worker"
        # One chain: bridge → intake → inference → sink.
        assert intake.parent_span_id == http_span.span_id
        assert inference.parent_span_id == intake.span_id
        assert sink.parent_span_id == inference.span_id
