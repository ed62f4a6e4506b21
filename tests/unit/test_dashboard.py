"""The Grafana dashboard and its provisioning: the JSON is what infra/grafana/build_dashboard.py
writes, every panel uses the provisioned data source, the files are where docker-compose.yml mounts
them, and every series a query reads is one the code exports.

The exported series are taken from the code, not from a list: the worker's registry
(streams.telemetry.metrics.REGISTRY), the collectors it registers when a worker starts (built here with empty
state; those named at their call site, like ValueCounter, are found by reading the source), and the
bridge's registry. Nothing is started and nothing is connected to.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import json
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

from streams.bridge.app import Bridge  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.telemetry import lag  # noqa: E402
from streams.telemetry import metrics as worker_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "inferstream.json"
BUILDER = GRAFANA / "build_dashboard.py"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "inferstream.yml"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "infra" / "prometheus" / "prometheus.yml"
SOURCES = [ROOT / "streams", ROOT / "agents"]
COLLECTOR_MODULES = [worker_metrics, lag]
# Series of other programs that the dashboard may read: Triton's own metrics (triton:8002).
FOREIGN_PREFIXES = ("nv_inference_",)
GRID_WIDTH = 24

# PromQL words that look like metric names but are not.
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan"}


# -- helpers ------------------------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(items: list[dict] | None = None) -> list[dict]:
    """Every panel, including those inside collapsed rows."""
    found = []
    for panel in _dashboard()["panels"] if items is None else items:
        found.append(panel)
        found += _panels(panel.get("panels") or [])
    return found


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [(f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"])
            for p in _panels() for t in p.get("targets", [])]


def _variables() -> list[dict]:
    return _dashboard().get("templating", {}).get("list", [])


def _variable_query(variable: dict) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else str(query)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small scanner, enough for dashboards)."""
    assert "__name__" not in expr, f"select series by name, not by __name__: {expr}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.groups()
        if not call and word.lower() not in PROMQL_KEYWORDS:  # a call is a function or an aggregation
            names.add(word)
    return names


def _variable_metric_names(query: str) -> set[str]:
    """Metric names in a Prometheus template-variable query: label_values(selector, label),
    query_result(expr), metrics(regex) or label_names()."""
    if match := re.fullmatch(r"\s*label_values\((?:(.*),)?\s*\w+\s*\)\s*", query, re.S):
        return metric_names(match.group(1) or "")
    if match := re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S):
        return metric_names(match.group(1))
    return set()


def _exposed_names(families: Iterable) -> set[str]:
    """The series names a scrape shows for these metric families (prometheus-client's naming)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
                "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "info": ("_info",)}
    names = set()
    for family in families:
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def _call_site_args(class_name: str) -> list[tuple[str, str]]:
    """(file, name) for each `class_name("literal", ...)` or `class_name(name="literal")` in the source."""
    found = []
    for directory in SOURCES:
        for path in sorted(directory.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if called != class_name:
                    continue
                args = [node.args[0]] if node.args else [k.value for k in node.keywords if k.arg == "name"]
                if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                    found.append((str(path.relative_to(ROOT)), args[0].value))
    return found


def _collector_classes() -> list[type]:
    """Classes with a collect() in the worker's metric modules: registered when a worker starts."""
    return [obj for module in COLLECTOR_MODULES for obj in vars(module).values()
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and callable(getattr(obj, "collect", None))]


def _collector_instances(cls: type) -> list[object]:
    """Instances of a collector with empty state: callables that return nothing, or, for one named at
    its call site (a `name` parameter), one per literal name in the source."""
    required = [p for p in inspect.signature(cls).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if all("Callable" in str(p.annotation) for p in required):
        return [cls(*(lambda: [] for _ in required))]
    if required and required[0].name == "name":
        placeholders = [(lambda: 0) if "Callable" in str(p.annotation) else "" for p in required[1:]]
        return [cls(name, *placeholders) for _, name in _call_site_args(cls.__name__)]
    pytest.fail(f"{cls.__module__}.{cls.__name__}: this test does not know how to build it empty; teach it")


def _bridge_families() -> list:
    async def build() -> list:
        # InferenceClient creates its aiokafka clients in __init__, which needs a running loop;
        # they are never started, so nothing connects.
        bridge = Bridge(Settings())
        try:
            return list(bridge.prometheus.collect())
        finally:
            await bridge.client.stop()  # closes the unstarted clients (no I/O)

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(build())
    finally:
        loop.close()


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Family name -> the series names a scrape shows, for every metric the code exports."""
    families = list(worker_metrics.REGISTRY.collect())
    for cls in _collector_classes():
        for collector in _collector_instances(cls):
            families += list(collector.collect())
    families += _bridge_families()
    return {family.name: _exposed_names([family]) for family in families}


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grafana_mounts() -> dict[str, tuple[Path, str]]:
    """Container path -> (host path, mode) of the grafana service's bind mounts."""
    mounts = {}
    for volume in yaml.safe_load(COMPOSE.read_text())["services"]["grafana"].get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith((".", "/")):
            mounts[target.rstrip("/")] = ((ROOT / source).resolve(), mode[0] if mode else "rw")
    return mounts


# -- the scanner itself --------------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (stage, outcome) (rate(a_total{stage="x"}[$__rate_interval]))', {"a_total"}),
    ('histogram_quantile(0.99, sum(rate(h_bucket{m=~"$model"}[5m])) by (le))', {"h_bucket"}),
    ("sum(max by (topic, partition) (lag)) / on (topic) group_left b + 1e6 * c offset 5m", {"lag", "b", "c"}),
    ('x / ignoring(code) y{code="by"} and bool z', {"x", "y", "z"}),
    ("count(up == 1) > 0", {"up"}),
])
def test_metric_names_scanner(expr, names):
    assert metric_names(expr) == names


def test_variable_query_scanner():
    assert _variable_metric_names('label_values(m_count{stage="end_to_end"}, model)') == {"m_count"}
    assert _variable_metric_names("label_values(model)") == set()


# -- the dashboard ------------------------------------------------------------------------------


def test_dashboard_is_what_the_builder_writes():
    assert DASHBOARD.read_text() == _load_builder().render(), \
        "the dashboard JSON is out of date: run python infra/grafana/build_dashboard.py"


def test_dashboard_shape():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = _panels()
    assert len(panels) > 10
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids), "every panel needs an integer id"
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    cells: dict[tuple[int, int], int] = {}
    for panel in _dashboard()["panels"]:  # top-level layout (collapsed rows hold their own)
        grid = panel.get("gridPos")
        assert grid and all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")), f"panel {panel['id']}"
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= GRID_WIDTH
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]


def test_panels_use_the_provisioned_datasource():
    provisioned = {d["uid"]: d["type"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    assert provisioned, "no data source provisioned"

    def check(where: str, datasource: object) -> None:
        assert isinstance(datasource, dict), f"{where}: no datasource (or a ${{DS_...}} name)"
        assert datasource.get("uid") in provisioned, f"{where}: datasource uid {datasource.get('uid')!r} " \
            f"is not provisioned ({sorted(provisioned)})"
        assert datasource.get("type", provisioned[datasource["uid"]]) == provisioned[datasource["uid"]], where

    for panel in _panels():
        where = f"panel {panel['id']} {panel.get('title')!r}"
        if panel["type"] == "row":
            assert not panel.get("targets"), f"{where}: a row has no queries"
            continue
        check(where, panel.get("datasource"))
        targets = panel.get("targets") or []
        assert targets, f"{where}: no queries"
        ref_ids = [t.get("refId") for t in targets]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), f"{where}: refIds {ref_ids}"
        for t in targets:
            assert t.get("expr"), f"{where}: target {t.get('refId')} has no expr"
            check(f"{where} target {t['refId']}", t.get("datasource", panel["datasource"]))
    for variable in _variables():
        if variable.get("type") == "query":
            check(f"variable {variable['name']}", variable.get("datasource"))


def test_queries_read_exported_series(exported):
    known = set().union(*exported.values())
    unknown = {}
    queries = _queries() + [(f"variable {v['name']}", _variable_query(v)) for v in _variables()
                            if v.get("type") == "query"]
    for where, expr in queries:
        names = metric_names(expr) if where.startswith("panel") else _variable_metric_names(expr)
        if where.startswith("panel"):
            assert names, f"{where}: no metric found in {expr!r}"
        missing = {n for n in names if n not in known and not n.startswith(FOREIGN_PREFIXES)}
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"series the code does not export: {unknown}\nexported: {sorted(known)}"


def test_every_exported_metric_is_on_the_dashboard(exported):
    used = set().union(*(metric_names(expr) for _, expr in _queries()))
    absent = sorted(family for family, names in exported.items() if not names & used)
    assert not absent, f"exported but on no panel: {absent} (add a panel in infra/grafana/build_dashboard.py)"


def test_the_collectors_were_found(exported):
    # The collectors a worker registers at start are in the set: breaker states, the rate limiter's
    # store outages (a ValueCounter named at its call site) and the consumer lag.
    assert {"inferstream_breaker_state", "inferstream_consumer_lag"} <= set(exported)
    value_counters = _call_site_args("ValueCounter")
    assert all(name.removesuffix("_total") in exported for _, name in value_counters)


def test_template_variables_are_used():
    variables = _variables()
    assert "model" in {v["name"] for v in variables}
    exprs = [expr for _, expr in _queries()]
    for variable in variables:
        pattern = re.compile(rf"\$(?:{variable['name']}\b|\{{{variable['name']}[}}:])")
        assert any(pattern.search(e) for e in exprs), f"variable ${variable['name']} is used by no query"


# -- provisioning and compose -------------------------------------------------------------------


def test_datasource_is_the_compose_prometheus():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    (datasource,) = [d for d in yaml.safe_load(DATASOURCES.read_text())["datasources"] if d["uid"] == "prometheus"]
    assert datasource["type"] == "prometheus"
    url = urlsplit(datasource["url"])
    assert url.hostname in services, f"{url.hostname} is no compose service"
    service = services[url.hostname]
    ports = {int(str(p).split("/")[0].rsplit(":", 1)[-1]) for p in service.get("ports", []) + service.get("expose", [])}
    assert url.port in ports
    scrape_interval = yaml.safe_load(PROMETHEUS.read_text())["global"]["scrape_interval"]
    assert datasource.get("jsonData", {}).get("timeInterval") == scrape_interval


def test_provisioning_is_mounted_where_grafana_reads_it():
    mounts = _grafana_mounts()
    for directory, path in [("datasources", DATASOURCES), ("dashboards", PROVIDERS)]:
        target = f"/etc/grafana/provisioning/{directory}"
        assert target in mounts, f"grafana: nothing mounted at {target}"
        source, mode = mounts[target]
        assert source == path.parent and mode == "ro", f"grafana: {target} should be {path.parent} (ro)"

    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert providers
    for provider in providers:
        assert provider.get("type", "file") == "file"
        path = provider["options"]["path"].rstrip("/")
        assert path in mounts, f"provider {provider['name']}: {path} is not mounted in grafana"
        source, mode = mounts[path]
        assert source == DASHBOARD.parent and mode == "ro"
        assert (source / DASHBOARD.name).exists()

    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    home = (grafana.get("environment") or {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        directory, name = home.rsplit("/", 1)
        assert directory in mounts and (mounts[directory][0] / name).exists(), home


def test_compose_sends_traces_to_jaeger_and_logs_json():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    formats = Settings.model_fields["log_format"].annotation.__args__
    for name in ("worker", "bridge"):
        env = services[name]["environment"]
        url = urlsplit(env["INFERSTREAM_OTLP_ENDPOINT"])
        assert url.scheme == "http" and url.hostname == "jaeger", f"{name}: OTLP/HTTP to jaeger"
        assert url.port == 4318, f"{name}: 4318 is OTLP/HTTP (4317 is gRPC, which the exporter does not speak)"
        assert f"{url.port}" in {str(p).split(":")[-1] for p in services["jaeger"].get("ports", [])
                                 + services["jaeger"].get("expose", [])}
        assert env["INFERSTREAM_LOG_FORMAT"] == "json" and "json" in formats
