"""`inferstream up` as a user runs it: every port checked before anything starts, a failed start
is a non-zero exit, and the console holds a short summary while the JSON logs go to files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cli_process import cli_popen, run_cli

from streams.harness import drop_database, isolated_settings
from streams.settings import Settings
from streams.stack import LocalStack, free_port, port_taken, weed_ports


@pytest.fixture
def up_settings(tmp_path, model_repository):
    """Settings of a private main job: its own state dir, free ports, bucket, topics, database."""
    tag = uuid.uuid4().hex[:8]
    settings = isolated_settings(tmp_path / "state", tag, model_repository=model_repository,
                                 bridge_port=free_port(), topic_prefix=f"up{tag}", app_id=f"up-{tag}")
    try:
        yield settings
    finally:
        LocalStack(settings).down()  # whatever a failed test left running
        asyncio.run(drop_database(settings.postgres_dsn))


def _stack_ports(settings: Settings) -> list[int]:
    return [settings.broker_port, *weed_ports(settings.s3_port).values()]


async def test_up_with_the_bridge_port_taken_starts_nothing_and_says_which_port(up_settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", up_settings.bridge_port))
        taken.listen()
        done = await run_cli("up", "--no-build", settings=up_settings, timeout=30, expect=2)
    assert done.lines == [f"error: port {up_settings.bridge_port} (HTTP bridge) is taken by another process; "
                          "set INFERSTREAM_BRIDGE_PORT to another port, or stop that process"], done.output
    pids = up_settings.state_dir / "pids"
    assert not (pids.exists() and any(pids.iterdir()))  # no broker, no S3 server
    assert not [port for port in _stack_ports(up_settings) if port_taken(port)]


def _wait_for(proc: subprocess.Popen, console: Path, text: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = console.read_text(errors="replace")
        if text in out:
            return out
        assert proc.poll() is None, f"up exited with {proc.returncode}:\n{out}"
        time.sleep(0.2)
    raise TimeoutError(f"no {text!r} after {timeout} s:\n{console.read_text(errors='replace')}")


def _json_lines(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


@pytest.mark.timeout(240)
def test_up_prints_a_summary_keeps_json_logs_in_files_and_stops_on_sigint(up_settings, tmp_path):
    console = tmp_path / "console.txt"
    with console.open("wb") as out:
        proc = cli_popen("up", "--no-build", settings=up_settings, stdout=out, stderr=subprocess.STDOUT)
    try:
        text = _wait_for(proc, console, "Ctrl-C stops everything")
        url = f"http://127.0.0.1:{up_settings.bridge_port}"
        for expected in (f"bridge: {url}", f"docs: {url}/openapi.json", f"metrics: {url}/metrics", "worker: pid ",
                         f"logs: {up_settings.state_dir / 'logs'}"):
            assert expected in text, text
        logs = up_settings.state_dir / "logs"
        deadline = time.monotonic() + 60
        while not (_json_lines(logs / "worker.log") and _json_lines(logs / "bridge.log")):
            assert time.monotonic() < deadline, "no JSON log lines in the worker's and bridge's log files"
            time.sleep(0.2)
        assert {r["service"] for r in _json_lines(logs / "bridge.log")} == {"bridge"}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=90)
    text = console.read_text(errors="replace")
    assert code == 0, text
    assert not [line for line in text.splitlines() if line.lstrip().startswith("{")], text  # no JSON here
    assert len(text.splitlines()) < 20 and text.rstrip().endswith("stopped"), text
    assert not any((up_settings.state_dir / "pids").iterdir())  # the stack it started is stopped


async def test_up_exits_non_zero_when_the_bridge_fails_to_start(up_settings):
    # A bridge with auth off refuses to listen on a non-loopback address: it exits at once.
    done = await run_cli("up", "--no-build", settings=up_settings, env={"INFERSTREAM_BRIDGE_HOST": "0.0.0.0"},
                         timeout=120, expect=1)
    failure = [line for line in done.lines if line.startswith("error: ")]
    assert len(failure) == 1 and "bridge (pid" in failure[0] and "while starting" in failure[0], done.output
    assert "Traceback" not in done.output
    assert not any((up_settings.state_dir / "pids").iterdir())
