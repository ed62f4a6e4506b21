"""Throughput with 1 versus 2 worker processes in one consumer group.

    python -m bench.workers [--backend triton|onnxruntime] [--requests N] [--timeout S]

`--backend triton` (the default where `.venv-triton` exists) is the case more workers are for:
`tiny` registered as a version whose only backend is a real tritonserver (see
infra/local/triton_server.py), so each inference batch is a gRPC round trip the worker awaits rather
than CPU it burns. `--backend onnxruntime` serves tiny in the workers' own onnxruntime: on a
2-core box that is CPU-bound, and a second process mostly competes for the same cores (STACK.md
measured 1.39x for two plain processes), which is worth knowing too.

Per pass: fresh topics and consumer group, the workers started and answering, then N requests
sent back to back through InferenceClient, timed from the first send to the last reply; then the
requests topic is replayed (streams/ops/replay.py), timed from the start until every copy's result is
in PostgreSQL (copies answer no caller). A private
stack (Tansu in memory, SeaweedFS, a fresh PostgreSQL database) on free ports; everything is
stopped by PID on exit. Figures go to bench/results/workers-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import loadavg
from bench.processes import private_stack
from infra.local import ROOT
from infra.local.harness import (
    Worker,
    isolated_settings,
    tiny_input,
    wait_ready,
)
from infra.local.triton_server import SETUP_HINT, TritonServer, triton_available
from models.build import build_models
from streams.client import InferenceClient
from streams.ops.replay import Replayer, ReplayJob
from streams.registry.records import BackendSpec, ModelRegistry
from streams.registry.store import save_record
from streams.settings import Settings
from streams.storage.results import ResultsStore
from streams.worker.app import bootstrap_registry

RESULTS_DIR = ROOT / "bench" / "results"
TRITON_VERSION = "io"  # tiny served by Triton; unversioned requests stay on version 1
# Piped output (CI, a log file) would otherwise wrap the table at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


async def register_triton_version(settings: Settings, server: TritonServer) -> None:
    tiny = ModelRegistry.load(settings.model_repository, ["tiny"]).get("tiny", "1")
    info = tiny.model_copy(update={"version": TRITON_VERSION, "weight": 0,
                                   "backends": [BackendSpec(kind="triton", url=server.grpc_url, protocol="grpc")]})
    await save_record(settings, info)


async def measure(settings: Settings, workers: list[Worker], version: str, requests: int, timeout: float) -> dict:
    async with InferenceClient(settings) as client:
        for worker in workers:
            await wait_ready(client, worker)
        batch = [client.request("tiny", version=version, timeout=timeout) for _ in range(requests)]
        started = time.monotonic()
        waiters = [await client.send(r, tiny_input(seed=i)) for i, r in enumerate(batch)]
        results = await asyncio.wait_for(asyncio.gather(*waiters), timeout)
        seconds = time.monotonic() - started
    failed = sum(r.header.status != "ok" for r in results)
    return {"requests": requests, "seconds": round(seconds, 2), "req_s": round(requests / seconds, 1),
            "failed": failed, **await measure_replay(settings, timeout)}


async def measure_replay(settings: Settings, timeout: float) -> dict:
    """Replay the whole requests topic (the burst and the readiness probes) and time it until
    every copy's result is stored: copies answer no caller, so PostgreSQL is where they end."""
    started = time.monotonic()
    progress = await Replayer(settings, ReplayJob(name=f"bench-{uuid.uuid4().hex[:6]}")).run()
    publish_rate = progress.rate  # a property of the elapsed time: read it now
    async with ResultsStore(settings.postgres_dsn) as results:
        rows = await results.wait_until_stored(list(progress.origins), timeout - (time.monotonic() - started))
    stored = len(rows)
    seconds = time.monotonic() - started
    return {"replayed": progress.published, "replay_publish_req_s": round(publish_rate, 1),
            "replay_stored": stored, "replay_seconds": round(seconds, 2),
            "replay_req_s": round(progress.published / seconds, 1)}


def run_pass(base: Settings, count: int, version: str, requests: int, timeout: float) -> dict:
    """`count` workers on fresh topics and a fresh group; the figures of one timed burst."""
    tag = uuid.uuid4().hex[:8]
    settings = base.model_copy(update={"topic_prefix": f"w{tag}", "app_id": f"bench-{tag}", "models": ["tiny"]})
    asyncio.run(bootstrap_registry(settings))  # this prefix's topics and registry records
    workers = [Worker(settings, settings.state_dir / f"worker-{count}-{i}.log").start() for i in range(count)]
    try:
        return {"workers": count, **asyncio.run(measure(settings, workers, version, requests, timeout))}
    finally:
        for worker in workers:
            worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["triton", "onnxruntime"],
                        default="triton" if triton_available() else "onnxruntime")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=180.0, help="bound of each pass")
    args = parser.parse_args()
    load = {"before": loadavg.before_run(console)}
    if args.backend == "triton" and not triton_available():
        raise SystemExit(f"no .venv-triton: {SETUP_HINT}")
    build_models(ROOT / "models" / "repository", ["tiny"])
    # SIGTERM unwinds like Ctrl-C through the cleanup below (as in bench.e2e).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    state = tempfile.TemporaryDirectory(prefix="bench-workers-")
    settings = isolated_settings(Path(state.name), uuid.uuid4().hex[:8])
    triton = TritonServer(settings.model_repository, ["tiny"], settings.state_dir / "triton.log")
    try:
        with private_stack(settings, console, triton):
            asyncio.run(bootstrap_registry(settings))  # the schema
            version = "1"
            if args.backend == "triton":
                triton.start()
                triton.wait_ready()
                asyncio.run(register_triton_version(settings, triton))
                version = TRITON_VERSION
            rows = [run_pass(settings, count, version, args.requests, args.timeout) for count in (1, 2)]
    finally:
        state.cleanup()
    load["after"] = loadavg.load_average()
    report(args.backend, rows, load)


def report(backend: str, rows: list[dict], load: dict) -> None:
    table = Table("backend", "workers", "requests", "seconds", "req/s", "failed", "vs 1 worker",
                  "replayed", "replay publish/s", "replay stored/s",
                  caption=loadavg.summary(load["before"], load["after"]))
    for row in rows:
        table.add_row(backend, str(row["workers"]), str(row["requests"]), f"{row['seconds']:.2f}",
                      f"{row['req_s']:.0f}",
                      str(row["failed"]), f"{row['req_s'] / rows[0]['req_s']:.2f}x",
                      f"{row['replay_stored']}/{row['replayed']}", f"{row['replay_publish_req_s']:.0f}",
                      f"{row['replay_req_s']:.0f}")
    console.print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"workers-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"model": "tiny", "backend": backend, "cpus": load["before"]["cores"],
                                "loadavg": loadavg.record(load["before"], load["after"]),
                                "passes": rows}, indent=2))
    console.print(f"written {path}")


if __name__ == "__main__":
    main()
