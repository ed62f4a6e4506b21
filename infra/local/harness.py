"""Workers and stacks as real processes on free ports: used by the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import numpy as np

from infra.local import ROOT
from infra.local.stack import free_port, weed_ports
from streams.cli.ports import port_taken
from streams.settings import Settings


def free_s3_port() -> int:
    """An S3 port whose derived weed ports are all free.

    Drawn from 20000-22700: clear of the default stack's (9000-9004, 19000-19004), and port +
    10004 stays under Linux's ephemeral range (32768+), where `free_port()` and outgoing
    connections take theirs.
    """
    for _ in range(100):
        base = random.randrange(20000, 22700, 5)
        if not any(port_taken(port) for port in weed_ports(base).values()):
            return base
    raise RuntimeError("no free block of S3 server ports")


def isolated_settings(state_dir: Path, run: str, **overrides: Any) -> Settings:
    """Settings for a private stack: free ports, its own bucket and database."""
    return Settings(
        broker_port=free_port(),
        s3_port=free_s3_port(),
        s3_bucket=f"run-{run}",
        postgres_dsn=f"postgresql://postgres@127.0.0.1:5432/inferstream_run_{run}",
        state_dir=state_dir,
        broker_storage="memory",
        **overrides,
    )


async def create_database(dsn: str) -> None:
    await _on_server(dsn, 'CREATE DATABASE "{name}"')


async def drop_database(dsn: str) -> None:
    await _on_server(dsn, 'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _on_server(dsn: str, statement: str) -> None:
    """Run a statement about the DSN's database from the server's `postgres` database."""
    base, _, name = dsn.rpartition("/")
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        await conn.execute(statement.format(name=name))
    finally:
        await conn.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """The env vars that give a subprocess the same settings."""
    return {
        f"INFERSTREAM_{name.upper()}": json.dumps(value) if isinstance(value, list) else str(value)
        for name, value in settings.model_dump().items()
    }


class Service:
    """An `inferstream <command>` process (worker, bridge), stopped by its PID."""

    command = ""

    def __init__(self, settings: Settings, log_path: Path, **overrides: object) -> None:
        self.settings = settings.model_copy(update=overrides)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "streams.cli", self.command]

    def start(self) -> Service:
        env = {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(), cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = self.proc.returncode if self.proc else None
            raise RuntimeError(f"{self.command} exited with {code}:\n{self.log()[-3000:]}")


class Worker(Service):
    command = "worker"


class BridgeProcess(Service):
    command = "bridge"

    @property
    def url(self) -> str:
        return f"http://{self.settings.bridge_host}:{self.settings.bridge_port}"

    async def wait_ready(self, timeout: float = 60.0, path: str = "/v2/health/live") -> None:
        """Until `path` answers 200. /v2/health/live does once the bridge has started (connected to
        the broker, PostgreSQL and Redis); /v2/health/ready only once a worker is live too."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                self.check_running()
                try:
                    async with session.get(f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"bridge: {path} not 200 after {timeout} s:\n{self.log()[-3000:]}")


def tiny_input(rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 16), dtype=np.float32)}


async def wait_ready(client, worker: Worker, timeout: float = 90.0) -> None:
    """Until the worker answers a tiny request (its consumers have joined their groups)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check_running()
        try:
            await client.infer("tiny", tiny_input(), timeout=3)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"worker not ready after {timeout} s:\n{worker.log()[-3000:]}")
