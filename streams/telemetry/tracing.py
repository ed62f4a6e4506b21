"""W3C trace context across Kafka: each stage continues the trace of the event it consumed (the
`traceparent` header) and writes its own span's context into the events it produces, so one trace
runs from the HTTP bridge (or any producer that sets the header) through intake, inference and
the sink to the reply.

Spans are exported over OTLP/HTTP when `otlp_endpoint` is set (the OpenTelemetry SDK records
them). Without it nothing is recorded or exported, and a span is a bare span context: trace ids
are still made, carried and logged (the caller's, or a new one) at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streams.settings import Settings

Headers = list[tuple[str, bytes]]

TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()
_IDS = RandomIdGenerator()
_tracer: trace.Tracer | None = None  # set when spans are exported


def setup_tracing(settings: Settings, service: str) -> None:
    """Export spans over OTLP/HTTP when `otlp_endpoint` is set (once per process, at start)."""
    global _tracer
    if not settings.otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    # A caller's sampling decision is kept; new traces are sampled.
    provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=ParentBased(ALWAYS_ON))
    endpoint = settings.otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _tracer = provider.get_tracer("inferstream")


def context_from(carrier: Headers | Mapping[str, str]) -> Context:
    """The trace context in Kafka headers (a list of pairs) or HTTP headers (a mapping)."""
    if isinstance(carrier, list):
        found = {k: v.decode(errors="replace") for k, v in carrier if k in TRACE_HEADERS}
    else:
        found = {k: carrier[k] for k in TRACE_HEADERS if k in carrier}
    return _PROPAGATOR.extract(found) if found else Context()


def start_span(name: str, carrier: Headers | Mapping[str, str], kind: SpanKind = SpanKind.CONSUMER,
               **attributes: str | int) -> Span:
    """A span continuing the carrier's trace (or starting one); the caller ends it."""
    context = context_from(carrier)
    if _tracer is not None:
        return _tracer.start_span(name, context=context, kind=kind, attributes=attributes)
    parent = trace.get_current_span(context).get_span_context()
    if parent.is_valid:
        return NonRecordingSpan(SpanContext(parent.trace_id, _IDS.generate_span_id(), False, parent.trace_flags,
                                            parent.trace_state))
    return NonRecordingSpan(SpanContext(_IDS.generate_trace_id(), _IDS.generate_span_id(), False,
                                        TraceFlags(TraceFlags.DEFAULT)))


def trace_headers(span: Span) -> dict[str, str]:
    """The span's W3C trace context headers."""
    context = span.get_span_context()
    headers = {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers


def with_trace(headers: Headers, span: Span) -> Headers:
    """The headers with the span's context in place of the consumed one."""
    kept = [(k, v) for k, v in headers if k not in TRACE_HEADERS]
    return kept + [(k, v.encode()) for k, v in trace_headers(span).items()]


def ids(span: Span) -> tuple[str | None, str | None]:
    """(trace id, span id) in hex, or Nones for an invalid span."""
    context = span.get_span_context()
    if not context.is_valid:
        return None, None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def fail(span: Span, code: str, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"))
