"""What the local broker does with a long poll: does a fetch come back early when a record arrives?

    python -m bench.longpoll [--storage memory s3] [--waits 10 100 500 1000] [--partitions 1 4]

Per broker storage, partition count and fetch wait (`fetch_max_wait_ms`, `fetch_min_bytes` 1):
a consumer assigned to every partition of a fresh topic at its end fetches in a loop while, in
the same process, a producer sends one small record at a time, each at a random moment of the
consumer's fetch cycle (a pause drawn from 0.5-1.5 waits between records), to the next partition.
A broker that answers a fetch as soon as data arrives (Apache Kafka) delivers each record a few
ms after it is acknowledged, whatever the wait; one that holds the fetch until the wait expires
delivers it on average half a wait later. Also measured, with nothing sent: the broker's (and,
with S3 storage, the S3 server's) CPU while one consumer polls at that wait.

Starts its own broker (and S3 server) on free ports, stops them by PID on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console
from rich.table import Table

from bench import loadavg
from bench.e2e import process_cpu
from infra.local import ROOT
from infra.local.harness import isolated_settings
from infra.local.stack import LocalStack
from streams.settings import Settings

RESULTS_DIR = ROOT / "bench" / "results"
IDLE_SECONDS = 10.0

console = Console(width=None if sys.stdout.isatty() else 160)


async def create_topic(settings: Settings, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def one_case(settings: Settings, pids: dict[str, int], partitions: int, wait_ms: int,
                   records: int) -> dict:
    topic = f"longpoll-{uuid.uuid4().hex[:8]}"
    await create_topic(settings, topic, partitions)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=0)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=wait_ms, fetch_min_bytes=1)
    await producer.start()
    await consumer.start()
    received: dict[int, float] = {}
    arrived = asyncio.Event()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)

        async def read() -> None:
            while True:
                for batch in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in batch:
                        received[int(record.key)] = time.perf_counter()
                        arrived.set()

        reader = asyncio.create_task(read())
        await asyncio.sleep(1.0)  # the fetcher is polling
        # Idle: nothing sent, one consumer polling at this wait.
        before = {name: process_cpu(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        await asyncio.sleep(IDLE_SECONDS)
        elapsed = time.perf_counter() - started
        idle = {name: (process_cpu(pid) - before[name]) / elapsed for name, pid in pids.items()}
        latencies, acks = [], []
        for i in range(records):
            await asyncio.sleep(random.uniform(0.5, 1.5) * wait_ms / 1000 + 0.02)
            arrived.clear()
            sent = time.perf_counter()
            await producer.send_and_wait(topic, b"x" * 100, key=str(i).encode(), partition=i % partitions)
            acks.append(time.perf_counter() - sent)
            async with asyncio.timeout(wait_ms / 1000 + 10):
                while i not in received:
                    await arrived.wait()
                    arrived.clear()
            latencies.append(received[i] - sent)
        reader.cancel()
    finally:
        await consumer.stop()
        await producer.stop()
    lat, ack = np.array(latencies) * 1000, np.array(acks) * 1000
    return {"partitions": partitions, "wait_ms": wait_ms, "records": records,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "max_ms": float(lat.max()), "ack_p50_ms": float(np.percentile(ack, 50)),
            "after_ack_p50_ms": float(np.percentile(lat - ack, 50)),
            "idle_cores": idle}


def run_storage(storage: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="inferstream-longpoll-") as state_dir:
        settings = isolated_settings(Path(state_dir), uuid.uuid4().hex[:8])
        stack = LocalStack(settings, broker_storage=storage)
        try:
            if storage == "memory":
                stack.broker_up()
            else:
                stack.up()
            pids = {name: int((Path(state_dir) / "pids" / f"{name}.pid").read_text())
                    for name in ("kafka", "s3") if (Path(state_dir) / "pids" / f"{name}.pid").exists()}
            for partitions in args.partitions:
                for wait_ms in args.waits:
                    row = {"storage": storage,
                           **asyncio.run(one_case(settings, pids, partitions, wait_ms, args.records))}
                    console.log(row)
                    rows.append(row)
        finally:
            stack.down()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.longpoll", description=__doc__.split("\n")[0])
    parser.add_argument("--storage", nargs="+", default=["memory", "s3"], choices=["memory", "s3"])
    parser.add_argument("--waits", type=int, nargs="+", default=[10, 100, 500, 1000])
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--records", type=int, default=20, help="records sent per case")
    parser.add_argument("--json-out", type=Path,
                        default=RESULTS_DIR / f"longpoll-{datetime.now():%Y%m%d-%H%M%S}.json")
    args = parser.parse_args(argv)
    load = {"before": loadavg.before_run(console)}
    rows = [row for storage in args.storage for row in run_storage(storage, args)]
    load["after"] = loadavg.load_average()
    table = Table("storage", "partitions", "fetch wait ms", "send->receive p50 / p90 / max ms",
                  "produce ack p50 ms", "after ack p50 ms", "idle cores: broker (+ s3)",
                  title="Long polls on the local broker (fetch_min_bytes=1)")
    for r in rows:
        idle = r["idle_cores"]
        table.add_row(r["storage"], str(r["partitions"]), str(r["wait_ms"]),
                      f"{r['p50_ms']:.1f} / {r['p90_ms']:.1f} / {r['max_ms']:.1f}",
                      f"{r['ack_p50_ms']:.1f}", f"{r['after_ack_p50_ms']:.1f}",
                      f"{idle['kafka']:.3f}" + (f" (+{idle['s3']:.3f})" if "s3" in idle else ""))
    console.print(table)
    console.print(loadavg.summary(load["before"], load["after"]))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"timestamp": datetime.now().isoformat(timespec="seconds"),
                                         "loadavg": loadavg.record(load["before"], load["after"]),
                                         "rows": rows}, indent=2) + "\n")
    console.print(f"figures written to {args.json_out}")


if __name__ == "__main__":
    main()
