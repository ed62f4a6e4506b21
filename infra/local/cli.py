"""`python -m infra.local`: the checkout's dev commands, beside the runtime's `inferstream`: the
main job (`up`), the local stack alone (`stack up|down|status`) and the model builds
(`models build`, the `models` extra). They behave like `inferstream`'s commands: one `error:`
line and exit 2 for a user's mistake, one line and exit 1 (`--debug`: the traceback) for an
unexpected error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.table import Table
from rich.text import Text

from infra.local.stack import LocalStack, StackError
from streams.cli.common import (
    INTERNAL_ERROR,
    USER_ERROR,
    CommandGroup,
    command_line,
    console,
    error,
    get_settings,
    refusing,
    run,
)
from streams.cli.ports import refuse_taken, service_ports
from streams.cli.topics import create_topics
from streams.settings import Settings
from streams.telemetry.logs import compact

UP_READY_TIMEOUT_S = 120.0

main_job = CommandGroup()
stack_app = CommandGroup(name="stack",
                         help="The local stack: start, stop and show the broker, S3 server, PostgreSQL and Redis.")
models_app = CommandGroup(name="models", help="Models: build them into the model repository.")


def _local_stack(settings: Settings, storage: str | None = None) -> LocalStack:
    with refusing(StackError):
        return LocalStack(settings, broker_storage=storage)


# -- stack -------------------------------------------------------------------------------------


@stack_app.command("up")
def stack_up(storage: Annotated[Optional[str], typer.Option(help="broker storage: s3 or memory")] = None) -> None:
    """Start the local stack (reusing what already runs) and create the topics."""
    settings = get_settings()
    with refusing(StackError):
        endpoints = _local_stack(settings, storage).up()
    for name, where in endpoints.items():
        console.print(f"{name:>9}: {where}")
    create_topics(settings)


@stack_app.command("down")
def stack_down() -> None:
    """Stop what `stack up` started (data stays in the state directory)."""
    _local_stack(get_settings()).down()


@stack_app.command("status")
def stack_status() -> None:
    """Each service: running, PID, endpoint."""
    table = Table("service", "running", "pid", "endpoint")
    for name, info in _local_stack(get_settings()).status().items():
        table.add_row(name, str(info.get("running")), str(info.get("pid") or "-"), str(info.get("endpoint")))
    console.print(table)


# -- models ------------------------------------------------------------------------------------


@models_app.command("build")
def models_build(
    only: Annotated[Optional[list[str]], typer.Option(help="model name (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="build again even when built")] = False,
) -> None:
    """Build the models into the model repository (cached: existing ones are kept)."""
    from models.build import build_models

    for path in build_models(get_settings().model_repository, only or None, force):
        console.print(f"model ready: {path}")


def _build_quietly(repository: Path) -> None:
    from models.build import MODELS, build_models, is_built

    missing = [name for name in MODELS if not is_built(repository / name)]
    if missing:
        console.print(f"   models: building {', '.join(missing)} (a few seconds each)...", highlight=False)
    build_models(repository)
    console.print(f"   models: {', '.join(MODELS)} in {repository}", highlight=False)


# -- the main job ------------------------------------------------------------------------------


class _Child:
    """A process `up` started (`inferstream worker` or `bridge`), its output appended to a log
    file that `up` follows."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            self._offset = log_file.tell()  # follow only what this run writes
            self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", name], stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def new_lines(self) -> list[str]:
        with self.log_path.open("rb") as log_file:
            log_file.seek(self._offset)
            data = log_file.read()
        end = data.rfind(b"\n") + 1  # a partly written line waits for the next call
        self._offset += end
        return data[:end].decode(errors="replace").splitlines()

    def last_message(self) -> str:
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return (compact(lines[-1]) or lines[-1]) if lines else "no output"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _wait_started(children: dict[str, _Child], ready_url: str) -> str | None:
    """Until the bridge answers; the error when a child exits first (or nothing answers)."""
    deadline = time.monotonic() + UP_READY_TIMEOUT_S
    while not _answers_http(ready_url):
        for name, child in children.items():
            if child.proc.poll() is not None:
                return (f"{name} (pid {child.proc.pid}) exited with {child.proc.returncode} while starting: "
                        f"{child.last_message()}; log: {child.log_path}")
        if time.monotonic() > deadline:
            return f"the bridge did not answer {ready_url} within {UP_READY_TIMEOUT_S:.0f} s; " \
                   f"log: {children['bridge'].log_path}"
        time.sleep(0.2)
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@main_job.command()
def up(
    build: Annotated[bool, typer.Option(help="build missing models first")] = True,
    storage: Annotated[Optional[str], typer.Option(help="broker storage: s3 or memory")] = None,
    json_logs: Annotated[bool, typer.Option(help="also print the worker's and bridge's JSON log lines here")]
    = False,
) -> None:
    """The main job: build models if missing, start the local stack and topics, run a worker and the bridge.

    Ctrl-C stops what it started; the next run reuses the stored data. Logs go to files under the
    state directory; on a terminal each event is also shown as one short line."""
    settings = get_settings()
    stack = _local_stack(settings, storage)
    # Every port this job binds, checked before anything starts (the stack's own that already
    # run are reused, not bound).
    refuse_taken(stack.ports_to_bind() + service_ports(settings, ("worker", "bridge")))
    if build:
        _build_quietly(settings.model_repository)
    started: dict[str, _Child] = {}
    # Ctrl-C, and a service manager's stop, end the job (also where SIGINT came in ignored).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    failed: str | None = None
    code = INTERNAL_ERROR
    try:
        try:
            endpoints = stack.up()
            create_topics(settings, quiet=True)
        except StackError as exc:
            failed, code = str(exc), USER_ERROR
            raise
        logs = settings.state_dir / "logs"
        started = {name: _Child(name, logs / f"{name}.log") for name in ("worker", "bridge")}
        bridge_url = f"http://{settings.bridge_host}:{settings.bridge_port}"
        failed = _wait_started(started, f"{bridge_url}/v2/health/live")
        if failed:
            raise StackError(failed)
        status = stack.status()
        pids = {name: started[name].proc.pid for name in started} | {
            name: status[name]["pid"] for name in ("kafka", "s3") if status[name]["pid"]}
        lines = [
            ("bridge", f"{bridge_url}  (pid {pids['bridge']})"),
            ("docs", f"{bridge_url}/openapi.json"),
            ("metrics", f"{bridge_url}/metrics"
                        + (f", worker http://127.0.0.1:{settings.metrics_port}/metrics"
                           if settings.metrics_port > 0 else "")),
            ("worker", f"pid {pids['worker']}"),
            ("kafka", f"{endpoints['kafka']}" + (f"  (pid {pids['kafka']})" if "kafka" in pids else "")),
            ("s3", f"{endpoints['s3']}" + (f"  (pid {pids['s3']})" if "s3" in pids else "")),
            ("postgres", endpoints["postgres"]),
            ("redis", endpoints["redis"]),
            ("logs", f"{logs}/{{worker,bridge,kafka,s3}}.log"),
        ]
        for name, where in lines:
            console.print(f"{name:>9}: {where}", soft_wrap=True, highlight=False)
        console.print("inferstream is up; Ctrl-C stops everything", highlight=False)
        follow = sys.stdout.isatty() or json_logs
        while not failed:
            for name, child in started.items():
                if follow:
                    for line in child.new_lines():
                        shown = line if json_logs else compact(line, name, chatter=False)
                        if shown:
                            console.print(Text(shown), soft_wrap=True)
                if child.proc.poll() is not None:
                    failed = f"{name} (pid {child.proc.pid}) exited with {child.proc.returncode}: " \
                             f"{child.last_message()}; log: {child.log_path}"
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except StackError:
        pass
    finally:
        for child in started.values():
            child.stop()
        stack.down()
        if failed:
            error(failed)
        else:
            console.print("stopped")
    if failed:
        raise typer.Exit(code)


app = command_line("The checkout's dev commands: the main job, the local stack, model builds.",
                   [main_job, stack_app, models_app])


def main() -> NoReturn:
    run(app)
