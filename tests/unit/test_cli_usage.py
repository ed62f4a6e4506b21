"""The command line as a user meets it, without a stack: help text, errors, start-up cost, port
checks, the progress and console lines."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys

import pytest
import typer
from support.cli_process import run_cli_sync
from support.load_targets import InstantTarget
from typer.testing import CliRunner

from infra.local import cli as dev_cli
from infra.local.stack import free_port
from streams.cli import app as cli
from streams.cli import keys
from streams.cli.ports import Port, port_problem
from streams.ops import load
from streams.telemetry.logs import compact

HEAVY = ("faust", "aiokafka", "numpy", "onnxruntime", "torch", "minio", "asyncpg", "pydantic")
# Type tags typer adds to options and arguments, and the braces it puts around arguments.
TYPE_TAG = re.compile(r"<(bool|str|int|float|path|list\[[^\]]*\]|[a-z]+ range|datetime)>"
                      r"|\b(TEXT|INTEGER|FLOAT|BOOLEAN|PATH)\b|\{[a-z_]+\}")


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_loads_no_heavy_module():
    """`inferstream --help` (and importing the CLI) starts without numpy, faust, aiokafka,
    onnxruntime, torch...: each command imports what it uses when it runs."""
    probe = ("import sys\nsys.argv = ['inferstream', '--help']\nfrom streams.cli.app import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = run_cli_sync("--help")
    assert done.code == 0 and "Usage:" in done.output and "Commands" in done.output, done.output
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    assert "LOADED []" in out, out


@pytest.mark.parametrize(("app", "name", "commands"), [
    (cli.app, "inferstream", 25), (dev_cli.app, "python -m infra.local", 6),
])
def test_every_command_has_a_description_and_help_without_type_tags(app, name, commands):
    root = typer.main.get_command(app)
    seen = 0
    for path, command in _commands(root):
        if path:
            assert (command.help or "").strip(), f"`{name} {' '.join(path)}` has no description"
            # The summary in the parent's list is the first paragraph: one line, or it breaks mid-sentence.
            assert "\n" not in command.help.strip().split("\n\n")[0], f"`{name} {' '.join(path)}` summary"
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        tags = TYPE_TAG.findall(result.output)
        assert not tags, f"`{name} {' '.join(path)} --help` shows {tags}:\n{result.output}"
        seen += 1
    assert seen > commands


def test_the_dev_commands_are_not_in_the_runtime_command_line():
    """`up`, `stack` and `models build` (torch) are the checkout's: `python -m infra.local`."""
    runtime = typer.main.get_command(cli.app)
    dev = typer.main.get_command(dev_cli.app)
    assert {"up", "stack"} <= set(dev.commands) and not {"up", "stack"} & set(runtime.commands)
    assert "build" in dev.commands["models"].commands and "build" not in runtime.commands["models"].commands
    models_help = CliRunner().invoke(cli.app, ["models", "--help"], env={"COLUMNS": "200"}).output
    assert all(word in models_help for word in ("list", "register", "change")), models_help


@pytest.mark.parametrize(("args", "message"), [
    (["replay", "--resume"], "--resume needs the --name of the replay"),
    (["replay", "--compare", "2", "--version", "3"], "--compare sets the version"),
    (["replay", "--since", "yesterday"], "yesterday"),
    (["dlq", "redrive"], "name the letters"),
    (["dlq", "show", "nowhere"], "nowhere"),
    (["load", "--target", "nowhere"], "--target is bridge, classify or kafka"),
    (["keys", "create", "--tenant", "a b"], "tenant 'a b' is not valid"),
    (["limits", "set", "a b", "10"], "is not valid"),
    (["models", "register", "m", "1", "--artifact", "m.onnx", "--backend", "cuda"], "'onnxruntime' or 'triton'"),
])
def test_a_user_error_is_one_line_and_exit_status_2(args, message):
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output


def test_an_unexpected_error_is_one_line_and_debug_shows_it_whole(monkeypatch):
    def broken(*args):
        raise RuntimeError("the store\nfell over")

    monkeypatch.setattr(keys, "with_stores", broken)
    result = CliRunner().invoke(cli.app, ["keys", "list"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "error: the store fell over (RuntimeError; --debug shows the traceback)"], result.output

    result = CliRunner().invoke(cli.app, ["--debug", "keys", "list"])
    assert isinstance(result.exception, RuntimeError) and "error:" not in result.output


def test_the_entry_point_reports_usage_errors_in_one_line_and_debug_prints_the_traceback():
    done = run_cli_sync("models", "set", "tiny", "1", "--weight", "many")
    assert done.code == 2 and len(done.lines) == 1, done.output
    assert done.output.startswith("error: ") and "--weight" in done.output, done.output

    # Nothing listens on port 1: the command fails unexpectedly, one line; --debug shows where.
    unreachable = {"INFERSTREAM_POSTGRES_DSN": "postgresql://postgres@127.0.0.1:1/none"}
    done = run_cli_sync("keys", "list", env=unreachable)
    assert done.code == 1 and len(done.lines) == 1 and done.output.startswith("error: "), done.output
    done = run_cli_sync("--debug", "keys", "list", env=unreachable)
    assert done.code == 1 and "Traceback (most recent call last)" in done.output, done.output


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_bridge_refuses_a_taken_port_in_one_line_before_starting(tmp_path):
    with _listening() as taken:
        port = taken.getsockname()[1]
        done = run_cli_sync("bridge", env={"INFERSTREAM_BRIDGE_PORT": str(port),
                                           "INFERSTREAM_STATE_DIR": str(tmp_path)})
    assert done.code == 2, done.output
    assert done.lines == [f"error: port {port} (HTTP bridge) is taken by another process; set "
                          "INFERSTREAM_BRIDGE_PORT to another port, or stop that process"], done.output


def test_worker_refuses_a_taken_metrics_port_before_starting():
    with _listening() as taken:
        port = taken.getsockname()[1]
        done = run_cli_sync("worker", "--workers", "2", env={"INFERSTREAM_METRICS_PORT": str(port)}, timeout=30)
    assert done.code == 2 and len(done.lines) == 1, done.output
    assert f"port {port} (worker metrics) is taken" in done.output and "INFERSTREAM_METRICS_PORT" in done.output


@pytest.mark.parametrize("command", [("worker", "--workers", "2"), ("bridge",)])
def test_serving_refuses_a_placeholder_secret_once_before_starting(command):
    """With auth required, a placeholder pepper is refused in one line, before any worker process
    starts (a supervisor would otherwise restart its workers until its limit)."""
    env = {"INFERSTREAM_AUTH_REQUIRED": "true", "INFERSTREAM_API_KEY_PEPPER": "CHANGE_ME",
           "INFERSTREAM_METRICS_PORT": "0", "INFERSTREAM_BRIDGE_PORT": str(free_port())}
    done = run_cli_sync(*command, env=env, timeout=30)
    assert done.code == 2 and len(done.lines) == 1, done.output
    assert "INFERSTREAM_API_KEY_PEPPER is shorter than" in done.output, done.output


def test_port_problem_names_a_taken_port_and_a_port_set_twice():
    with _listening() as taken:
        port = taken.getsockname()[1]
        assert re.fullmatch(f"port {port} \\(kafka\\) is taken .*set INFERSTREAM_BROKER_PORT .*",
                            port_problem([Port(port, "kafka", "INFERSTREAM_BROKER_PORT")]) or "")
    assert re.match("port 8000 is set for both HTTP bridge .* and worker metrics",
                    port_problem([Port(8000, "HTTP bridge", "INFERSTREAM_BRIDGE_PORT"),
                                  Port(8000, "worker metrics", "INFERSTREAM_METRICS_PORT")]) or "")
    assert port_problem([]) is None


def test_compact_log_lines():
    line = json.dumps({"level": "INFO", "logger": "inferstream.requests", "message": "answered", "process": 7,
                       "service": "bridge", "time": "2026-12-02T16:49:33.123+00:00", "stage": "bridge",
                       "request_id": "r1", "trace_id": "t", "status": 200})
    assert compact(line) == "16:49:33 bridge answered stage=bridge request_id=r1 status=200"
    chatter = json.dumps({"level": "INFO", "logger": "aiokafka.consumer", "message": "Joined group",
                          "time": "2026-12-02T16:49:33+00:00"})
    assert compact(chatter, "worker", chatter=False) is None
    assert compact(chatter, "worker") == "16:49:33 worker Joined group"
    lifecycle = json.dumps({"level": "INFO", "logger": "streams.worker.app", "message": "[^-WorkerApp]: Starting..."})
    assert compact(lifecycle, chatter=False) is None
    failure = json.dumps({"level": "ERROR", "logger": "faust.worker", "message": "crashed", "time": "",
                          "exc_info": "Traceback ...\nOSError: address in use"})
    assert compact(failure, "worker", chatter=False) == "worker ERROR crashed (OSError: address in use)"
    assert compact("plain text\n") == "plain text"


class _Target(InstantTarget):
    """A load target that answers at once, every third request with an error."""

    error_every = 3


def test_load_reports_counts_while_it_runs():
    seen: list[str] = []

    def progress(tally: load.Tally) -> None:
        seen.append(tally.line())

    done = asyncio.run(load.run(_Target(), rate=40, duration=0.5, progress=progress, every_s=0.1))
    assert done.summary["sent"] == 20
    assert len(seen) >= 3 and all(re.match(r"\s*[\d.]+ s  sent \d+  answered \d+  errors \d+", s) for s in seen)
    last = load.Tally(sent=20, ok=14, errors=6, started=0.0).line(now=2.0)
    assert last == "   2.0 s  sent 20  answered 14  errors 6  dropped 0  7.0 ok/s"
