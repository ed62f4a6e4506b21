"""Fixtures for the integration suite: a real local stack (Tansu broker, SeaweedFS S3 server,
PostgreSQL, Redis) on free ports, and inferstream workers as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from models.build import build_models
from streams.settings import Settings
from streams.stack import LocalStack, port_taken, weed_ports
from topics.admin import ensure_topics

ROOT = Path(__file__).resolve().parent.parent


def free_s3_base() -> int:
    """An S3 port whose derived weed ports are all free."""
    for _ in range(200):
        base = random.randrange(20000, 40000)
        if not any(port_taken(p) for p in [base, *weed_ports(base).values()]):
            return base
    raise RuntimeError("no free port block for the S3 server")


def free_port() -> int:
    for _ in range(200):
        port = random.randrange(41000, 50000)
        if not port_taken(port):
            return port
    raise RuntimeError("no free port")


def settings_env(settings: Settings) -> dict[str, str]:
    """The env vars that give a subprocess the same settings."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, list):
            value = json.dumps(value)
        env[f"INFERSTREAM_{name.upper()}"] = str(value)
    return env


@pytest.fixture(scope="session")
def model_repository() -> Path:
    repository = ROOT / "models" / "repository"
    build_models(repository)
    return repository


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory, model_repository) -> Iterator[Settings]:
    """One stack for the whole session; each test gets its own topics and consumer groups."""
    run = uuid.uuid4().hex[:8]
    broker_port = free_port()
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{broker_port}",
        broker_port=broker_port,
        s3_port=(s3_port := free_s3_base()),
        s3_endpoint=f"127.0.0.1:{s3_port}",
        s3_bucket=f"test-{run}",
        postgres_dsn=f"postgresql://postgres@127.0.0.1:5432/inferstream_test_{run}",
        state_dir=tmp_path_factory.mktemp("stack"),
        model_repository=model_repository,
        broker_storage="memory",
    )
    stack = LocalStack(settings)
    stack.up()
    try:
        yield settings
    finally:
        stack.down()
        asyncio.run(_drop_database(settings.postgres_dsn))


async def _drop_database(dsn: str) -> None:
    base, _, name = dsn.rpartition("/")
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def settings(stack_settings: Settings) -> Settings:
    """Per test: fresh topics (prefix), consumer group (app id) and results table rows."""
    tag = uuid.uuid4().hex[:8]
    return stack_settings.model_copy(update={"topic_prefix": f"t{tag}", "app_id": f"app-{tag}"})


class Worker:
    """An `inferstream worker` process, stopped by its PID."""

    def __init__(self, settings: Settings, log_path: Path, **overrides: object) -> None:
        self.settings = settings.model_copy(update=overrides)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        env = {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], cwd=ROOT, env=env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
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


@pytest.fixture
def topics_ready(settings: Settings) -> Settings:
    asyncio.run(ensure_topics(settings, ["tiny", "resnet18", "efficientnet-lite0"]))
    return settings


@pytest.fixture
def start_worker(topics_ready: Settings, tmp_path: Path):
    """Start workers on the test's settings; all are stopped (SIGTERM) at the end."""
    workers: list[Worker] = []

    def start(**overrides: object) -> Worker:
        worker = Worker(topics_ready, tmp_path / f"worker-{len(workers)}.log", **overrides).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def tiny_input(rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 16), dtype=np.float32)}


async def wait_ready(client, worker: Worker, timeout: float = 90.0) -> None:
    """Until the worker answers a tiny request (its consumers have joined their groups)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.proc.returncode}:\n{worker.log()[-3000:]}")
        try:
            await client.infer("tiny", tiny_input(), timeout=3)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"worker not ready after {timeout} s:\n{worker.log()[-3000:]}")
