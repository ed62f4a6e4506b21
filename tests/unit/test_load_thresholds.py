"""`inferstream load`'s thresholds: their evaluation against the figures, the command's exit
status and report; and the k6 script in infra/load/, parsed, against `make load` (the same
scenario, stages and thresholds), so the two cannot drift apart."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from rich.console import Console
from support.load_targets import InstantTarget
from typer.testing import CliRunner

from streams.cli import app as cli
from streams.ops import load
from streams.ops.load import DROPPED, ERROR, OK, Attempt, Thresholds, Verdict, evaluate, summarize, verdict_table

ROOT = Path(__file__).resolve().parents[2]
K6_SCRIPT = ROOT / "infra" / "load" / "inference.js"


def figures(error_rate: float | None = 0.0, p95: float | None = 40.0, p99: float | None = 90.0,
            achieved: float = 50.0) -> dict:
    return {"error_rate": error_rate, "latency_ms": {"p95": p95, "p99": p99}, "achieved_rate": achieved}


def test_each_threshold_passes_at_its_limit_and_fails_beyond_it():
    limits = Thresholds(max_error_rate=0.01, p95_ms=40, p99_ms=90, min_rate=50)
    assert [(v.threshold, v.limit, v.passed) for v in evaluate(figures(error_rate=0.01), limits)] == [
        ("error rate", "<= 0.01", True), ("latency p95 ms", "<= 40", True), ("latency p99 ms", "<= 90", True),
        ("achieved ok/s", ">= 50", True)]
    broken = evaluate(figures(error_rate=0.011, p95=40.5, p99=91, achieved=49.9), limits)
    assert [v.passed for v in broken] == [False] * 4
    assert [v.measured for v in broken] == [0.011, 40.5, 91, 49.9]
    # One broken alone fails alone.
    assert [v.passed for v in evaluate(figures(p99=91), limits)] == [True, True, False, True]


def test_unset_thresholds_are_not_checked_and_nothing_measured_fails():
    assert evaluate(figures(error_rate=1.0, achieved=0), Thresholds()) == []
    assert [v.threshold for v in evaluate(figures(), Thresholds(p99_ms=100))] == ["latency p99 ms"]
    # No ok reply: no latency to compare, which breaks a latency threshold rather than passing it.
    silent = evaluate(figures(error_rate=1.0, p95=None, p99=None, achieved=0),
                      Thresholds(max_error_rate=0, p95_ms=1000, min_rate=0))
    assert [(v.threshold, v.measured, v.passed) for v in silent] == [
        ("error rate", 1.0, False), ("latency p95 ms", None, False), ("achieved ok/s", 0, True)]
    assert silent[1].line() == "latency p95 ms - (limit <= 1000): FAIL"
    assert silent[0].line() == "error rate 1 (limit <= 0): FAIL"


def test_the_error_rate_counts_every_request_not_answered_ok():
    attempts = [Attempt(0.0, 0.0, 0.01, OK), Attempt(0.1, None, 0.1, DROPPED), Attempt(0.2, 0.2, 0.3, ERROR, "X"),
                Attempt(0.3, 0.3, 0.31, OK)]
    summary = summarize(attempts, rate=10, duration=0.4)
    [verdict] = evaluate(summary, Thresholds(max_error_rate=0.4))
    assert verdict.measured == 0.5 and not verdict.passed


def test_verdict_table_shows_limits_values_and_results():
    console = Console(record=True, width=120)
    console.print(verdict_table([Verdict("error rate", "<= 0", 0.25, False), Verdict("latency p99 ms", "<= 90", 12.5,
                                                                                        True)]))
    text = console.export_text()
    assert re.search(r"error rate\s+│\s+<= 0\s+│\s+0.25\s+│\s+FAIL", text), text
    assert re.search(r"latency p99 ms\s+│\s+<= 90\s+│\s+12.5\s+│\s+PASS", text), text


class _HalfFailing(InstantTarget):
    """A bridge target that answers at once, every other request with an error."""

    error_every = 2


def run_load_command(monkeypatch, tmp_path: Path, *thresholds: str):
    monkeypatch.setattr(load, "BridgeTarget", _HalfFailing)
    figures_path = tmp_path / "figures.json"
    result = CliRunner().invoke(cli.app, ["load", "--url", "http://bridge", "--rate", "40", "--duration", "0.25",
                                          "--json", str(figures_path), *thresholds], env={"COLUMNS": "200"})
    return result, json.loads(figures_path.read_text())


def test_a_broken_threshold_exits_1_and_names_it(monkeypatch, tmp_path):
    result, summary = run_load_command(monkeypatch, tmp_path, "--max-error-rate", "0.1", "--min-rate", "1")
    assert result.exit_code == 1, result.output
    assert re.search(r"error rate\s+│\s+<= 0.1\s+│\s+0.5\s+│\s+FAIL", result.output), result.output
    assert re.search(r"achieved ok/s\s+│\s+>= 1\s+│.*PASS", result.output), result.output
    assert "error: thresholds broken: error rate 0.5 (limit <= 0.1): FAIL" in result.output
    assert "achieved ok/s" not in result.output.split("thresholds broken:")[1]  # only the broken one
    assert summary["thresholds"][0] == {"threshold": "error rate", "limit": "<= 0.1", "measured": 0.5,
                                        "passed": False}


def test_thresholds_met_exit_0(monkeypatch, tmp_path):
    result, summary = run_load_command(monkeypatch, tmp_path, "--max-error-rate", "0.5", "--p95-ms", "10000")
    assert result.exit_code == 0, result.output
    assert [v["passed"] for v in summary["thresholds"]] == [True, True]
    assert "thresholds broken" not in result.output
    result, summary = run_load_command(monkeypatch, tmp_path)  # none given: none checked
    assert result.exit_code == 0 and "thresholds" not in summary, result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--stages", "10s:5", "--rate", "5"], "--stages replaces --rate"),
    (["--stages", "10s:5", "--warmup", "1"], "--stages replaces --rate"),
    (["--stages", "10s"], "--stages takes DURATION:RATE"),
    (["--target", "classify"], "--target classify sends the --image file"),
    (["--target", "classify", "--image", "cat.png", "--version", "2"], "takes no --version"),
    (["--image", "cat.png"], "--image is for --target classify"),
    (["--max-error-rate", "1.5"], "--max-error-rate"),
    (["--p99-ms", "-1"], "--p99-ms"),
])
def test_load_refuses_bad_options_with_status_2(args, message):
    result = CliRunner().invoke(cli.app, ["load", "--url", "http://127.0.0.1:1", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and message in result.output, result.output


# -- the k6 script against `make load` -----------------------------------------------------------


def k6_options() -> dict:
    """The script's `options`, written as plain JSON there so that it parses here."""
    match = re.search(r"^export const options = (\{.*?^\});$", K6_SCRIPT.read_text(), re.DOTALL | re.MULTILINE)
    assert match, "infra/load/inference.js: no `export const options = {...};` block"
    return json.loads(match.group(1))


def make_load() -> tuple[str, dict]:
    """The Makefile's `load` target: its BRIDGE default and the `inferstream load` options of its
    recipe, parsed by the command's own parser (an option it does not know fails here)."""
    makefile = (ROOT / "Makefile").read_text()
    bridge = re.search(r"^load: BRIDGE \?= (\S+)$", makefile, re.MULTILINE)
    recipe = re.search(r"^load:.*?\n((?:\t.*\n)+)", makefile.replace("\\\n", " "), re.MULTILINE)
    assert bridge and recipe, "Makefile: no `load` target with a BRIDGE default"
    argv = shlex.split(recipe.group(1))
    assert argv[:2] == ["$(VENV)/bin/inferstream", "load"], argv
    command = typer.main.get_command(cli.app).commands["load"]
    return bridge.group(1), command.make_context("load", argv[2:]).params


def k6_limits(expressions: list[str]) -> dict[str, float]:
    """k6 threshold expressions ('p(95)<=500', 'rate>=35') as {aggregation+operator: limit}."""
    limits = {}
    for expression in expressions:
        match = re.fullmatch(r"([a-z()0-9]+)\s*(<=|>=)\s*([\d.]+)", expression)
        assert match, f"unexpected k6 threshold {expression!r}"
        limits[match.group(1) + match.group(2)] = float(match.group(3))
    return limits


def test_k6_script_runs_the_stages_and_thresholds_of_make_load():
    bridge, params = make_load()
    options = k6_options()
    scenario = options["scenarios"]["inference"]
    assert scenario["executor"] == "ramping-arrival-rate" and scenario["timeUnit"] == "1s"
    # Stages from 0 req/s, as the command's staged schedule; k6's durations in the --stages syntax.
    assert scenario["startRate"] == 0
    k6_stages = load.parse_stages(",".join(f"{s['duration']}:{s['target']}" for s in scenario["stages"]))
    assert k6_stages == load.parse_stages(params["stages"])
    assert scenario["maxVUs"] == params["max_inflight"]  # the same bound on requests in flight

    thresholds = options["thresholds"]
    assert set(thresholds) == {"http_req_failed", "http_req_duration{expected_response:true}", "inferstream_ok"}
    assert k6_limits(thresholds["http_req_failed"]) == {"rate<=": params["max_error_rate"]}
    # Latency of ok requests only, as the command's percentiles.
    assert k6_limits(thresholds["http_req_duration{expected_response:true}"]) == {
        "p(95)<=": params["p95_ms"], "p(99)<=": params["p99_ms"]}
    assert k6_limits(thresholds["inferstream_ok"]) == {"rate>=": params["min_rate"]}

    # The same scenario: the OIP infer route of the same model, on the same bridge by default.
    script = K6_SCRIPT.read_text()
    assert params["target"] == "bridge" and params["url"] == "http://$(BRIDGE)"
    assert f'__ENV.BRIDGE || "{bridge}"' in script
    assert f"/v2/models/{params['model']}/infer" in script
    assert 'new Counter("inferstream_ok")' in script and "response.status === 200" in script


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the script's syntax is not checked")
def test_k6_script_is_valid_javascript(tmp_path):
    module = tmp_path / "inference.mjs"  # an ES module, as k6 reads it
    module.write_text(K6_SCRIPT.read_text())
    done = subprocess.run(["node", "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
