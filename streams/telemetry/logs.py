"""Process logging: JSON lines (or plain text) on stdout, with request and trace ids, and no
secrets: bearer tokens, JWTs and API keys are masked in every line, exceptions included.

`compact` turns one such JSON line into a short line for a person at a terminal (`inferstream up`).

`log_request` writes the one line per request and stage that lets an operator follow a request
through the pipeline by its request id or trace id. Those lines cost about as much CPU as the rest
of a small model's request path, so `log_requests` can keep a share of traces: chosen by trace id,
the same in every stage and process, so a trace is logged whole or not at all. Refused and
dead-lettered requests are always logged.
"""

from __future__ import annotations

import logging
import re
import sys

import orjson
from opentelemetry.trace import Span
from pythonjsonlogger.orjson import OrjsonFormatter

from streams.settings import Settings
from streams.telemetry import tracing

REQUEST_LOG = logging.getLogger("inferstream.requests")
_TRACE_SPACE = 1 << 32  # the trace id's last 32 bits, random, decide its sampling
_sampled_below = _TRACE_SPACE

# A JWT (three base64url parts, the first a JSON header), an inferstream API key, and whatever
# follows "Bearer".
_SECRETS = re.compile(r"eyJ[\w-]{4,}\.[\w-]+\.[\w-]*|isk_[\w-]+|(?i:bearer)\s+[^\s\"',;]+")
MASK = "[redacted]"


def redact(text: str) -> str:
    lowered = text.lower()  # a cheap test first: most lines hold nothing like a secret
    if "eyj" not in lowered and "isk_" not in lowered and "bearer" not in lowered:
        return text
    return _SECRETS.sub(MASK, text)


class _RedactingJson(OrjsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _RedactingText(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(settings: Settings, service: str) -> None:
    """Replace the root logger's handlers with one on stdout in the configured format."""
    global _sampled_below
    handler = logging.StreamHandler(sys.stdout)
    if settings.log_format == "json":
        handler.setFormatter(_RedactingJson(
            "{levelname}{name}{message}{process}", style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service}, timestamp="time",
        ))
    else:
        handler.setFormatter(_RedactingText("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    # Skip what no line shows: the caller's file and line (a stack walk per record), thread and
    # multiprocessing names (the logging HOWTO's "Optimization").
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    REQUEST_LOG.setLevel(logging.INFO if settings.log_requests > 0 else logging.WARNING)
    _sampled_below = round(settings.log_requests * _TRACE_SPACE)


def log_request(span: Span, stage: str, message: str, request_id: str | None, level: int = logging.INFO,
                **fields: object) -> None:
    """One line for a request at a stage, with its ids: at INFO for a sampled trace, at WARNING
    (requests refused or dead-lettered) always."""
    if not REQUEST_LOG.isEnabledFor(level):
        return
    trace_id, span_id = tracing.ids(span)
    if level < logging.WARNING and _sampled_below < _TRACE_SPACE and not (
        trace_id and int(trace_id[-8:], 16) < _sampled_below
    ):
        return
    REQUEST_LOG.log(level, message, extra={"stage": stage, "request_id": request_id, "trace_id": trace_id,
                                           "span_id": span_id, **fields})


# Fields every JSON line has, or that only a machine wants: not repeated in a compact line.
_ROUTINE_FIELDS = {"level", "logger", "message", "process", "service", "time", "trace_id", "span_id", "taskName",
                   "exc_info", "stack_info"}
_OWN_LOGGERS = ("inferstream", "streams", "agents", "topics", "models")


def compact(line: str, service: str | None = None, chatter: bool = True) -> str | None:
    """One log line as a person reads it: `HH:MM:SS service [LEVEL] message key=value...`, with
    an exception's last line. A line that is not a JSON object is returned as it is. With
    `chatter=False`, INFO and DEBUG lines of libraries (faust, aiokafka...) and of services
    starting and stopping give None."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line.rstrip()
    if not isinstance(record, dict):
        return line.rstrip()
    level = str(record.get("level", "INFO"))
    logger = str(record.get("logger", ""))
    message = str(record.get("message", ""))
    if not chatter and level in ("DEBUG", "INFO") and (
        not logger.startswith(_OWN_LOGGERS) or message.startswith("[^")  # mode's service start/stop lines
    ):
        return None
    stamp = str(record.get("time", ""))[11:19]
    parts = [stamp, str(service or record.get("service", ""))]
    if level not in ("DEBUG", "INFO"):
        parts.append(level)
    parts.append(message)
    parts += [f"{key}={value}" for key, value in record.items() if key not in _ROUTINE_FIELDS and value is not None]
    error = str(record.get("exc_info") or "").strip().splitlines()
    if error:
        parts.append(f"({error[-1]})")
    return " ".join(part for part in parts if part)
