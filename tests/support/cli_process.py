"""`inferstream ARGS` (or a dev command, `python -m infra.local ARGS`) as a real process, the way
a user runs it: shared by the tests that drive a command line through its entry point."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from infra.local import ROOT
from infra.local.harness import settings_env
from streams.settings import Settings

RUNTIME_CLI = "streams.cli"  # `inferstream`
DEV_CLI = "infra.local"  # the checkout's dev commands: up, stack, models build


def cli_argv(*args: str, cli: str = RUNTIME_CLI) -> list[str]:
    return [sys.executable, "-m", cli, *args]


def cli_env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CLI process: the test's settings, a wide console (tables are not cut)
    and no buffering (a process killed mid-run still shows its output)."""
    return {**os.environ, **(settings_env(settings) if settings else {}), "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1", **extra}


def cli_popen(*args: str, settings: Settings | None = None, env: dict[str, str] | None = None,
              cli: str = RUNTIME_CLI, **popen: Any) -> subprocess.Popen:
    """A long-running CLI process (worker, up...) in its own session, stopped by its PID."""
    return subprocess.Popen(cli_argv(*args, cli=cli), cwd=ROOT, env=cli_env(settings, **(env or {})),
                            start_new_session=True, **popen)


@dataclass(frozen=True)
class CliRun:
    code: int
    output: str  # stdout and stderr, interleaved

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()]


async def run_cli(*args: str, settings: Settings | None = None, env: dict[str, str] | None = None,
                  timeout: float = 120.0, expect: int | None = 0, cli: str = RUNTIME_CLI) -> CliRun:
    """Run the command to its end (killed past `timeout`); with `expect`, assert its exit status."""
    proc = await asyncio.create_subprocess_exec(
        *cli_argv(*args, cli=cli), cwd=ROOT, env=cli_env(settings, **(env or {})),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    done = CliRun(proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace"))
    if expect is not None:
        assert done.code == expect, f"exit {done.code}, expected {expect}:\n{done.output}"
    return done


def run_cli_sync(*args: str, settings: Settings | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60.0) -> CliRun:
    """`run_cli` for tests without an event loop; no status asserted."""
    done = subprocess.run(cli_argv(*args), cwd=ROOT, env=cli_env(settings, **(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return CliRun(done.returncode, done.stdout.decode(errors="replace"))
