"""Fixtures for the integration suite: a real local stack (Tansu broker, SeaweedFS S3 server,
PostgreSQL, Redis) on free ports, and inferstream workers as real processes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.local import ROOT
from infra.local.harness import (
    BridgeProcess,
    Worker,
    create_database,
    drop_database,
    isolated_settings,
)
from infra.local.stack import LocalStack, free_port
from models.build import build_models
from streams.settings import Settings
from streams.worker.app import bootstrap_registry

TEST_PEPPER = "integration-tests-api-key-pepper-0123456789"


@pytest.fixture(scope="session")
def model_repository() -> Path:
    repository = ROOT / "models" / "repository"
    build_models(repository)
    return repository


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory, model_repository) -> Iterator[Settings]:
    """One stack for the whole session; each test gets its own topics and consumer groups."""
    settings = isolated_settings(
        tmp_path_factory.mktemp("stack"), uuid.uuid4().hex[:8], model_repository=model_repository,
        # Tansu delays a new group's first join by about half the session timeout: 1 s, not 3 s.
        kafka_session_timeout_s=2,
    )
    stack = LocalStack(settings)
    stack.up()
    try:
        yield settings
    finally:
        stack.down()
        asyncio.run(drop_database(settings.postgres_dsn))


@pytest.fixture
def settings(stack_settings: Settings) -> Iterator[Settings]:
    """Per test: fresh topics (prefix), consumer groups (app id) and database."""
    tag = uuid.uuid4().hex[:8]
    dsn = f"{stack_settings.postgres_dsn}_{tag}"
    asyncio.run(create_database(dsn))
    try:
        # A pepper that workers and bridges started with auth required accept (not the dev default).
        yield stack_settings.model_copy(update={"topic_prefix": f"t{tag}", "app_id": f"app-{tag}", "postgres_dsn": dsn,
                                                "api_key_pepper": TEST_PEPPER})
    finally:
        asyncio.run(drop_database(dsn))


@pytest.fixture
def topics_ready(settings: Settings) -> Settings:
    """Topics created and the built models registered (as a worker does at start)."""
    asyncio.run(bootstrap_registry(settings))
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


@pytest.fixture
def start_bridge(topics_ready: Settings, tmp_path: Path):
    """Start bridges (each on a free port) on the test's settings; stopped at the end."""
    bridges: list[BridgeProcess] = []

    async def start(**overrides: object) -> BridgeProcess:
        overrides = {"bridge_port": free_port(), **overrides}
        bridge = BridgeProcess(topics_ready, tmp_path / f"bridge-{len(bridges)}.log", **overrides).start()
        bridges.append(bridge)
        await bridge.wait_ready()
        return bridge

    yield start
    for bridge in bridges:
        bridge.stop()
