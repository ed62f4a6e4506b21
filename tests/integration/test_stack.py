"""The local stack on its own ports and state dir, beside any stack already running here."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.local.harness import free_s3_port
from infra.local.stack import LocalStack, StackError, free_port, weed_ports
from streams.cli.ports import port_taken
from streams.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MESSAGES = 100
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
def make_stack(tmp_path: Path):
    """Builds stacks on free ports under tmp_path; stops them all at the end of the test."""
    stacks: list[LocalStack] = []

    def make(name: str = "stack", **settings) -> LocalStack:
        settings = {"broker_port": free_port(), "s3_port": free_s3_port(),
                    "s3_bucket": "stack-test", "state_dir": tmp_path / name} | settings
        stack = LocalStack(Settings(**settings))
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.down()


def pids(stack: LocalStack) -> dict[str, int]:
    return {name: state["pid"] for name, state in stack.status().items() if state["pid"]}


def assert_gone(stack: LocalStack, old_pids: dict[str, int]) -> None:
    for name, pid in old_pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still exists"
    assert not list((stack.state_dir / "pids").iterdir())
    ports = [stack.settings.broker_port, *weed_ports(stack.settings.s3_port).values()]
    assert not [port for port in ports if port_taken(port)]
    sockets = [path for port in ports
               for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock")]
    assert not sockets, "weed's unix sockets are left behind"


async def produce(bootstrap: str, topic: str, count: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all",
                                request_timeout_ms=10_000)
    await producer.start()
    try:
        sent = [await producer.send(topic, f"m{i}".encode(), key=str(i).encode())
                for i in range(count)]
        await asyncio.wait_for(asyncio.gather(*sent), 30)
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int) -> set[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, request_timeout_ms=10_000)
    await consumer.start()
    seen: set[bytes] = set()
    try:
        async with asyncio.timeout(30):
            while len(seen) < count:
                batches = await consumer.getmany(timeout_ms=500)
                seen.update(record.value for records in batches.values() for record in records)
    finally:
        await consumer.stop()
    return seen


async def test_durable_stack_survives_broker_kill(make_stack):
    database = f"stack_test_{uuid.uuid4().hex[:8]}"
    stack = make_stack(postgres_dsn=f"{PG_SERVER}/{database}")
    assert stack.broker_storage == "s3"

    endpoints = stack.up()
    assert endpoints == {
        "kafka": f"127.0.0.1:{stack.settings.broker_port}",
        "s3": f"http://127.0.0.1:{stack.settings.s3_port}",
        "postgres": f"{PG_SERVER}/{database}",
        "redis": stack.settings.redis_url,
    }
    started = pids(stack)
    assert set(started) == {"kafka", "s3"}
    assert stack.up() == endpoints and pids(stack) == started  # reused, not restarted

    try:
        await produce(endpoints["kafka"], "durable", MESSAGES)
        os.kill(started["kafka"], signal.SIGKILL)
        stack.up()
        restarted = pids(stack)
        assert restarted["kafka"] != started["kafka"] and restarted["s3"] == started["s3"]
        expected = {f"m{i}".encode() for i in range(MESSAGES)}
        assert await consume(endpoints["kafka"], "durable", MESSAGES) == expected
    finally:
        admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.close()

    stack.down()
    assert_gone(stack, restarted)
    assert not any(state["running"] for name, state in stack.status().items()
                   if name in ("kafka", "s3"))


def test_taken_broker_port_is_reported(make_stack):
    stack = make_stack()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", stack.settings.broker_port))
        blocker.listen()
        with pytest.raises(StackError, match=f"port {stack.settings.broker_port} .*"
                                             "INFERSTREAM_BROKER_PORT"):
            stack.up()
    assert pids(stack) == {}  # nothing was started


def test_taken_s3_server_port_is_reported(make_stack):
    stack = make_stack()
    filer_grpc = weed_ports(stack.settings.s3_port)["filer.port.grpc"]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", filer_grpc))
        blocker.listen()
        with pytest.raises(StackError, match=f"port {filer_grpc} .*INFERSTREAM_S3_PORT"):
            stack.up()
    assert pids(stack) == {}


async def test_two_memory_stacks_side_by_side(make_stack):
    first = make_stack("first", broker_storage="memory")
    second = make_stack("second", broker_storage="memory")
    assert first.broker_storage == second.broker_storage == "memory"
    endpoints = [first.up(), second.up()]
    assert all(state["reachable"] for stack in (first, second)
               for state in stack.status().values())

    for endpoint in endpoints:
        await produce(endpoint["kafka"], "side-by-side", 10)
        assert len(await consume(endpoint["kafka"], "side-by-side", 10)) == 10

    running = [pids(first), pids(second)]
    first.down()
    second.down()
    assert_gone(first, running[0])
    assert_gone(second, running[1])
