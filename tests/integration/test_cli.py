"""The main job (`python -m infra.local up`) as a user runs it: every port checked before anything
starts, a failed start is a non-zero exit, and the console holds a short summary while the JSON
logs go to files. And the other commands, runtime and dev, on a real stack."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from support.cli_process import DEV_CLI, RUNTIME_CLI, cli_popen, run_cli
from support.waiting import wait_for_sync

from infra.local.harness import drop_database, isolated_settings
from infra.local.stack import LocalStack, free_port, weed_ports
from streams.cli.ports import port_taken
from streams.settings import Settings


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
        done = await run_cli("up", "--no-build", settings=up_settings, timeout=30, expect=2, cli=DEV_CLI)
    assert done.lines == [f"error: port {up_settings.bridge_port} (HTTP bridge) is taken by another process; "
                          "set INFERSTREAM_BRIDGE_PORT to another port, or stop that process"], done.output
    pids = up_settings.state_dir / "pids"
    assert not (pids.exists() and any(pids.iterdir()))  # no broker, no S3 server
    assert not [port for port in _stack_ports(up_settings) if port_taken(port)]


def _wait_for(proc: subprocess.Popen, console: Path, text: str, timeout: float = 120.0) -> str:
    def printed() -> str | None:
        out = console.read_text(errors="replace")
        assert text in out or proc.poll() is None, f"up exited with {proc.returncode}:\n{out}"
        return out if text in out else None

    return wait_for_sync(printed, timeout=timeout, interval=0.2, what=f"{text!r} printed by up")


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
        proc = cli_popen("up", "--no-build", settings=up_settings, cli=DEV_CLI, stdout=out, stderr=subprocess.STDOUT)
    try:
        text = _wait_for(proc, console, "Ctrl-C stops everything")
        url = f"http://127.0.0.1:{up_settings.bridge_port}"
        for expected in (f"bridge: {url}", f"docs: {url}/openapi.json", f"metrics: {url}/metrics", "worker: pid ",
                         f"logs: {up_settings.state_dir / 'logs'}"):
            assert expected in text, text
        logs = up_settings.state_dir / "logs"
        wait_for_sync(lambda: _json_lines(logs / "worker.log") and _json_lines(logs / "bridge.log"), timeout=60,
                      interval=0.2, what="JSON log lines in the worker's and bridge's log files")
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
                         timeout=120, expect=1, cli=DEV_CLI)
    failure = [line for line in done.lines if line.startswith("error: ")]
    assert len(failure) == 1 and "bridge (pid" in failure[0] and "while starting" in failure[0], done.output
    assert "Traceback" not in done.output
    assert not any((up_settings.state_dir / "pids").iterdir())


async def test_registry_keys_limits_results_and_dead_letters_through_the_cli(topics_ready, model_repository):
    """Each read and write command as a user types it, on the test's stack."""
    settings = topics_ready

    async def cli(*args: str, expect: int = 0, program: str = RUNTIME_CLI) -> str:
        return (await run_cli(*args, settings=settings, timeout=60, expect=expect, cli=program)).output

    assert "topics: all present" in await cli("topics", "create")
    assert "model ready: " in await cli("models", "build", "--only", "tiny", program=DEV_CLI)
    assert re.search(r"│ tiny +│ 1 +│ active", await cli("models", "list"))
    artifact = model_repository / "tiny" / "1" / "model.onnx"
    assert "registered tiny/2 (revision 1, draft, weight 0)" in await cli("models", "register", "tiny", "2",
                                                                           "--artifact", str(artifact))
    assert "tiny/2: revision 2, active, weight 5" in await cli("models", "set", "tiny", "2", "--status", "active",
                                                               "--weight", "5")
    assert "error: no registered version tiny/9" in await cli("models", "set", "tiny", "9", "--weight", "1", expect=2)
    assert re.search(r"│ tiny +│ 2 +│ active +│ 5 ", await cli("models", "list"))

    key = re.search(r"isk_([0-9a-f]+)_\S+", await cli("keys", "create", "--tenant", "acme", "--name", "ci"))
    assert key, "no key printed"
    assert key.group(1) in await cli("keys", "list", "--tenant", "acme")
    assert f"revoked {key.group(1)}" in await cli("keys", "revoke", key.group(1))
    assert "error: no key nope" in await cli("keys", "revoke", "nope", expect=2)

    assert "acme: 10 requests per minute" in await cli("limits", "set", "acme", "10")
    assert re.search(r"│ acme +│ 10 ", await cli("limits", "list"))
    assert "acme: default limit" in await cli("limits", "clear", "acme")

    assert "error: no result for nothing-here" in await cli("result", "nothing-here", expect=2)
    assert "position" in await cli("dlq", "list")
    assert "error: no dead letter at 0:999999" in await cli("dlq", "show", "0:999999", expect=2)
    assert re.search(r"│ kafka +│ True ", await cli("stack", "status", program=DEV_CLI))


async def test_stack_up_checks_its_ports_then_starts_reuses_and_stops(up_settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", up_settings.broker_port))
        taken.listen()
        done = await run_cli("stack", "up", settings=up_settings, timeout=30, expect=2, cli=DEV_CLI)
    assert len(done.lines) == 1 and f"port {up_settings.broker_port} (kafka)" in done.output, done.output
    assert "INFERSTREAM_BROKER_PORT" in done.output
    assert not [port for port in _stack_ports(up_settings) if port_taken(port)]  # the S3 server did not start

    out = (await run_cli("stack", "up", settings=up_settings, timeout=60, cli=DEV_CLI)).output
    assert f"kafka: 127.0.0.1:{up_settings.broker_port}" in out and "topics: created" in out, out
    # What runs is reused: its ports are not checked again.
    assert "topics: all present" in (await run_cli("stack", "up", settings=up_settings, timeout=60, cli=DEV_CLI)).output
    assert re.search(r"│ s3 +│ True ", (await run_cli("stack", "status", settings=up_settings, cli=DEV_CLI)).output)
    await run_cli("stack", "down", settings=up_settings, timeout=60, cli=DEV_CLI)
    assert not [port for port in _stack_ports(up_settings) if port_taken(port)]
