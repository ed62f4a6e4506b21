"""Builds `infra/grafana/dashboards/inferstream.json`, the Grafana dashboard provisioned by
docker-compose.yml. This script is its one source of truth: edit it, run

    python infra/grafana/build_dashboard.py

and commit both. tests/unit/test_dashboard.py checks that the JSON is what this script writes, and
that every series a query reads is one the code exports.

Series (see streams/telemetry/metrics.py, streams/bridge/app.py, streams/ops/scaling.py): the workers export
inferstream_requests_total{stage,outcome}, inferstream_errors_total{stage,code},
inferstream_dead_letters_total{stage,reason}, inferstream_step_retries_total{stage},
inferstream_latency_seconds{stage,model}, inferstream_batch_size{model,backend},
inferstream_backend_errors_total{model,backend}, inferstream_breaker_state{model,version,backend},
inferstream_rate_limit_store_unavailable_total and inferstream_consumer_lag{topic,partition,group};
the bridge inferstream_bridge_*; Triton its own nv_inference_* on :8002.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "inferstream.json"

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/prometheus.yml
RATE = "$__rate_interval"
MODEL = 'model=~"$model"'
GRID_WIDTH = 24
QUANTILES = (0.5, 0.95, 0.99)
# Stages of inferstream_latency_seconds drawn in the latency row (sink_delay is with the sink).
LATENCY_STAGES = {
    "queue_wait": "Queue wait: created → picked up by the inference agent",
    "batch_formation": "Batch formation: submitted to the batcher → its batch starts",
    "inference": "Inference: the backend call of a batch",
    "end_to_end": "End to end: created → reply produced",
}
BREAKER_MAPPINGS = [{
    "type": "value",
    "options": {
        "0": {"text": "closed", "color": "green", "index": 0},
        "1": {"text": "half-open", "color": "yellow", "index": 1},
        "2": {"text": "open", "color": "red", "index": 2},
    },
}]


# -- queries ------------------------------------------------------------------------------------


def rate(metric: str, by: str = "", selector: str = "") -> str:
    grouping = f"sum by ({by}) " if by else "sum"
    matchers = f"{{{selector}}}" if selector else ""
    return f"{grouping}(rate({metric}{matchers}[{RATE}]))"


def ratio(numerator: str, denominator: str) -> str:
    return f"{numerator} / {denominator}"


def quantile(q: float, histogram: str, by: str, selector: str = "") -> str:
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', ', '.join(['le', *filter(None, [by])]), selector)})"


def target(expr: str, legend: str = "", ref: str = "A", **extra: object) -> dict:
    return {"datasource": DATASOURCE, "editorMode": "code", "expr": expr, "legendFormat": legend or "__auto",
            "range": True, "refId": ref, **extra}


def targets(*pairs: tuple[str, str]) -> list[dict]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def quantile_targets(histogram: str, by: str, selector: str, legend: str) -> list[dict]:
    return targets(*((quantile(q, histogram, by, selector), f"p{round(q * 100)} {legend}".strip())
                     for q in QUANTILES))


# -- panels -------------------------------------------------------------------------------------


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def timeseries(title: str, description: str, panel_targets: list[dict], unit: str = "short", width: int = 12,
               height: int = 8, stack: bool = False, min_zero: bool = True) -> dict:
    custom = {
        "drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 10, "showPoints": "never",
        "spanNulls": False, "axisSoftMin": 0 if min_zero else None,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": {"unit": unit, "color": {"mode": "palette-classic"},
                                     "custom": {k: v for k, v in custom.items() if v is not None}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                               "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": panel_targets,
    }


def stat(title: str, description: str, panel_targets: list[dict], unit: str = "short", width: int = 6,
         height: int = 4, thresholds: list[tuple[float | None, str]] | None = None) -> dict:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat", "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": {"unit": unit, "color": {"mode": "thresholds"},
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "orientation": "auto",
                    "textMode": "auto"},
        "targets": panel_targets,
    }


def state_timeline(title: str, description: str, panel_targets: list[dict], width: int = 12,
                   height: int = 8) -> dict:
    return {
        "type": "state-timeline", "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": {"mappings": BREAKER_MAPPINGS, "color": {"mode": "thresholds"},
                                     "thresholds": {"mode": "absolute", "steps": [
                                         {"value": None, "color": "green"}, {"value": 1, "color": "yellow"},
                                         {"value": 2, "color": "red"}]},
                                     "custom": {"fillOpacity": 80, "lineWidth": 0}},
                        "overrides": []},
        "options": {"mergeValues": True, "showValue": "auto", "alignValue": "left", "rowHeight": 0.9,
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "single", "sort": "none"}},
        "targets": panel_targets,
    }


def heatmap(title: str, description: str, expr: str, width: int = 12, height: int = 8) -> dict:
    return {
        "type": "heatmap", "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"calculate": False, "cellGap": 1, "cellValues": {"unit": "short"},
                    "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5,
                              "steps": 64, "reverse": False, "fill": "dark-orange"},
                    "rowsFrame": {"layout": "auto"}, "yAxis": {"axisPlacement": "left", "unit": "short"},
                    "filterValues": {"le": 1e-9}, "showValue": "never", "legend": {"show": True},
                    "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
                    "exemplars": {"color": "rgba(255,0,255,0.7)"}},
        "targets": [target(expr, "{{le}}", format="heatmap")],
    }


# -- the dashboard ------------------------------------------------------------------------------


def panels() -> list[dict]:
    return [
        row("Throughput"),
        timeseries("Requests by stage and outcome",
                   "Requests leaving each worker stage (intake: auth, limits, routing; inference; sink: "
                   "PostgreSQL). ok; rejected: dead-lettered; refused: policy or outage, the caller gets "
                   "an error.",
                   targets((rate("inferstream_requests_total", "stage, outcome"), "{{stage}} {{outcome}}")),
                   unit="reqps", width=16),
        stat("Inference ok ratio", "Share of requests leaving the inference stage with outcome ok.",
             targets((ratio(rate("inferstream_requests_total", selector='stage="inference", outcome="ok"'),
                            rate("inferstream_requests_total", selector='stage="inference"')), "ok")),
             unit="percentunit", width=8, height=8,
             thresholds=[(None, "red"), (0.95, "yellow"), (0.99, "green")]),

        row("Errors"),
        timeseries("Errors by stage and code", "Rejected and refused requests by error code.",
                   targets((rate("inferstream_errors_total", "stage, code"), "{{stage}} {{code}}")),
                   unit="reqps", width=8, stack=True),
        timeseries("Dead letters by stage and reason", "Events sent to the dead-letter topic.",
                   targets((rate("inferstream_dead_letters_total", "stage, reason"), "{{stage}} {{reason}}")),
                   unit="reqps", width=8, stack=True),
        timeseries("Rate limiting",
                   "Requests refused with RATE_LIMITED (by stage), the bridge's 429 answers, and limiter "
                   "checks Redis could not answer (the request then passes unlimited or fails UNAVAILABLE, "
                   "by policy).",
                   targets((rate("inferstream_errors_total", "stage", 'code="RATE_LIMITED"'), "RATE_LIMITED {{stage}}"),
                           (rate("inferstream_bridge_requests_total", selector='status="429"'), "bridge 429"),
                           (rate("inferstream_rate_limit_store_unavailable_total"), "limiter store unavailable")),
                   unit="reqps", width=8),
        timeseries("Step retries by stage", "Agent steps retried after a service outage or an error.",
                   targets((rate("inferstream_step_retries_total", "stage"), "{{stage}}")), unit="ops", width=24,
                   height=6),

        row("Latency"),
        *(timeseries(f"Latency: {stage}", f"{text}. p50 / p95 / p99 over the selected models.",
                     quantile_targets("inferstream_latency_seconds", "", f'stage="{stage}", {MODEL}', ""),
                     unit="s", width=6)
          for stage, text in LATENCY_STAGES.items()),
        timeseries("End-to-end latency per model", "Created → reply produced, per model: p50 and p99.",
                   targets(*((quantile(q, "inferstream_latency_seconds", "model", f'stage="end_to_end", {MODEL}'),
                              f"p{round(q * 100)} {{{{model}}}}") for q in (0.5, 0.99))),
                   unit="s", width=12),
        timeseries("p99 latency by stage", "p99 of every stage of inferstream_latency_seconds.",
                   targets((quantile(0.99, "inferstream_latency_seconds", "stage", MODEL), "p99 {{stage}}")),
                   unit="s", width=12),

        row("Batching and backends"),
        timeseries("Average batch size", "Items per backend batch, by model and backend.",
                   targets((ratio(rate("inferstream_batch_size_sum", "model, backend", MODEL),
                                  rate("inferstream_batch_size_count", "model, backend", MODEL)),
                            "{{model}} {{backend}}")), width=8),
        heatmap("Batch size distribution", "Batches per bucket of inferstream_batch_size (items per batch).",
                f"sum by (le) (increase(inferstream_batch_size_bucket{{{MODEL}}}[{RATE}]))", width=8),
        timeseries("Backend batches", "Backend batch calls per second, by model and backend.",
                   targets((rate("inferstream_batch_size_count", "model, backend", MODEL), "{{model}} {{backend}}")),
                   unit="ops", width=8),
        timeseries("Backend errors", "Failed backend batch calls, by model and backend.",
                   targets((rate("inferstream_backend_errors_total", "model, backend", MODEL),
                            "{{model}} {{backend}}")),
                   unit="ops", width=12),
        state_timeline("Circuit breakers",
                       "Per backend: closed, half-open or open; the worst state over all workers.",
                       targets((f"max by (model, version, backend) (inferstream_breaker_state{{{MODEL}}})",
                                "{{model}} v{{version}} {{backend}}")), width=12),

        row("Kafka and sink"),
        timeseries("Consumer lag by topic",
                   "Events not yet committed by the workers' group, per topic (the maximum over "
                   "exporters of each partition, so a duplicate exporter does not double it).",
                   targets(("sum by (topic) (max by (topic, partition) (inferstream_consumer_lag))", "{{topic}}")),
                   width=12),
        stat("Total consumer lag", "Sum over topics and partitions.",
             targets(("sum(max by (topic, partition) (inferstream_consumer_lag))", "lag")), width=4, height=8,
             thresholds=[(None, "green"), (5000, "yellow"), (50000, "red")]),
        timeseries("Sink delay", "Result produced → stored in PostgreSQL: p50 / p95 / p99.",
                   quantile_targets("inferstream_latency_seconds", "", f'stage="sink_delay", {MODEL}', ""),
                   unit="s", width=8),

        row("HTTP bridge"),
        timeseries("Bridge requests by status", "HTTP requests per second by status (scrapes of /metrics "
                   "left out).",
                   targets((rate("inferstream_bridge_requests_total", "status", 'route!="/metrics"'), "{{status}}")),
                   unit="reqps", width=8, stack=True),
        timeseries("Bridge latency p99 by route", "p99 of HTTP request latency per route.",
                   targets((quantile(0.99, "inferstream_bridge_request_seconds", "route", 'route!="/metrics"'),
                            "{{route}}")),
                   unit="s", width=8),
        stat("Bridge 5xx ratio", "Share of HTTP answers with a 5xx status.",
             targets((ratio(rate("inferstream_bridge_requests_total", selector='route!="/metrics", status=~"5.."'),
                            rate("inferstream_bridge_requests_total", selector='route!="/metrics"')), "5xx")),
             unit="percentunit", width=8, height=8,
             thresholds=[(None, "green"), (0.01, "yellow"), (0.05, "red")]),
        timeseries("Pending replies", "Requests waiting for their reply, per bridge instance.",
                   targets(("sum by (instance) (inferstream_bridge_pending_replies)", "{{instance}}")), width=12),
        timeseries("Late and unmatched replies",
                   "Replies after their deadline (dropped) and replies for no waiting request.",
                   targets((rate("inferstream_bridge_late_replies_total"), "late"),
                           (rate("inferstream_bridge_unmatched_replies_total"), "unmatched")),
                   unit="ops", width=12),

        row("Triton"),
        timeseries("Triton inference requests", "Successful and failed inference requests on Triton "
                   "(nv_inference_*, from triton:8002), by Triton model.",
                   targets((rate("nv_inference_request_success", "model"), "ok {{model}}"),
                           (rate("nv_inference_request_failure", "model"), "failed {{model}}")),
                   unit="reqps", width=12),
        timeseries("Triton time per request", "Average queue and compute time per successful request.",
                   targets((ratio(rate("nv_inference_queue_duration_us", "model"),
                                  rate("nv_inference_request_success", "model")) + " / 1e6", "queue {{model}}"),
                           (ratio(rate("nv_inference_compute_infer_duration_us", "model"),
                                  rate("nv_inference_request_success", "model")) + " / 1e6", "compute {{model}}")),
                   unit="s", width=12),
    ]


def layout(items: list[dict]) -> list[dict]:
    """Number the panels and place them left to right, top to bottom; a row takes a line."""
    x = y = line_height = 0
    for panel_id, panel in enumerate(items, start=1):
        panel["id"] = panel_id
        if panel["type"] == "row":
            y += line_height
            panel["gridPos"] = {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}
            x, y, line_height = 0, y + 1, 0
            continue
        width, height = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if x + width > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        x, line_height = x + width, max(line_height, height)
    return items


def dashboard() -> dict:
    model_query = "label_values(inferstream_latency_seconds_count, model)"
    return {
        "uid": "inferstream",
        "title": "inferstream",
        "description": "Kafka-native inference: workers, HTTP bridge, Triton. Built by "
                       "infra/grafana/build_dashboard.py.",
        "tags": ["inferstream"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": [{
            "name": "model", "label": "Model", "type": "query", "datasource": DATASOURCE,
            "definition": model_query,
            "query": {"query": model_query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1, "hide": 0,
            "regex": "", "options": [], "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }]},
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
