"""Trace context, secret masking and request log lines, without I/O."""

from __future__ import annotations

import io
import json
import logging

import pytest

from streams.settings import Settings
from streams.telemetry import tracing
from streams.telemetry.logs import MASK, log_request, redact, setup_logging

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE}-b7ad6b7169203331-01"


def test_a_span_continues_the_trace_in_kafka_headers():
    span = tracing.start_span("intake", [("other", b"x"), ("traceparent", PARENT.encode())])
    trace_id, span_id = tracing.ids(span)
    assert trace_id == TRACE and span_id != "b7ad6b7169203331"
    assert tracing.trace_headers(span)["traceparent"] == f"00-{TRACE}-{span_id}-01"


def test_a_span_continues_the_trace_in_http_headers_and_keeps_tracestate():
    span = tracing.start_span("bridge", {"traceparent": PARENT, "tracestate": "vendor=1"})
    headers = tracing.trace_headers(span)
    assert headers["traceparent"].split("-")[1] == TRACE and headers["tracestate"] == "vendor=1"


@pytest.mark.parametrize("carrier", [[], [("traceparent", b"garbage")], {"traceparent": "00-" + "0" * 32 + "-1-01"}])
def test_without_a_valid_parent_a_new_trace_starts(carrier):
    first, second = tracing.start_span("intake", carrier), tracing.start_span("intake", carrier)
    assert tracing.ids(first)[0] and tracing.ids(first)[0] != tracing.ids(second)[0]
    assert tracing.trace_headers(first)["traceparent"].endswith("-00")  # not sampled: nothing exported


def test_with_trace_replaces_the_consumed_context():
    span = tracing.start_span("inference", [("traceparent", PARENT.encode())])
    headers = tracing.with_trace([("traceparent", PARENT.encode()), ("tracestate", b"a=1"), ("k", b"v")], span)
    assert [k for k, _ in headers].count("traceparent") == 1
    assert ("k", b"v") in headers and ("tracestate", b"a=1") not in headers
    assert dict(headers)["traceparent"].decode() == tracing.trace_headers(span)["traceparent"]


@pytest.mark.parametrize("secret", [
    "Bearer abc.def-ghi", "bearer sometoken", "BEARER x1",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0In0.c2lnbmF0dXJl", "isk_1a2b3c4d_SeCrEt-value_x",
])
def test_secrets_are_masked(secret):
    masked = redact(f"credentials {secret} refused")
    assert secret not in masked and MASK in masked
    assert masked.startswith("credentials ") and masked.endswith(" refused")


def test_plain_text_is_untouched():
    line = '{"message": "routed", "model": "tiny", "request_id": "0f3c"}'
    assert redact(line) is line


@pytest.fixture
def captured():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_request_lines_are_json_with_ids_and_no_secrets(captured):
    setup_logging(Settings(log_format="json", log_requests=1), "worker")
    logging.getLogger().handlers[0].setStream(captured)
    span = tracing.start_span("intake", [("traceparent", PARENT.encode())])
    log_request(span, "intake", "routed", "r1", model="tiny", error="bad key isk_ab_cdef")
    record = json.loads(captured.getvalue())
    assert record["service"] == "worker" and record["level"] == "INFO" and record["message"] == "routed"
    assert record["stage"] == "intake" and record["request_id"] == "r1"
    assert record["trace_id"] == TRACE and record["span_id"] == tracing.ids(span)[1]
    assert "isk_ab_cdef" not in captured.getvalue() and record["error"] == f"bad key {MASK}"


def test_request_lines_can_be_turned_off(captured):
    setup_logging(Settings(log_requests=0), "worker")
    logging.getLogger().handlers[0].setStream(captured)
    log_request(tracing.start_span("intake", []), "intake", "routed", "r1")
    log_request(tracing.start_span("intake", []), "intake", "rejected", "r2", logging.WARNING, code="UNDECODABLE")
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [(r["message"], r["level"], r["request_id"]) for r in lines] == [("rejected", "WARNING", "r2")]


def test_a_share_of_traces_is_logged_whole(captured):
    setup_logging(Settings(log_requests=0.25), "worker")
    logging.getLogger().handlers[0].setStream(captured)
    spans = [tracing.start_span("intake", []) for _ in range(2000)]
    for stage in ("intake", "inference", "sink"):
        for span in spans:
            log_request(tracing.start_span(stage, tracing.with_trace([], span)), stage, "done", "r")
    stages: dict[str, set[str]] = {}
    for line in captured.getvalue().splitlines():
        record = json.loads(line)
        stages.setdefault(record["trace_id"], set()).add(record["stage"])
    assert 0.2 * len(spans) < len(stages) < 0.3 * len(spans)
    assert all(found == {"intake", "inference", "sink"} for found in stages.values())
