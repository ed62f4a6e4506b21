"""The main job at idle: the CPU it burns with nothing to do, and how fast a request that comes
after a quiet spell is answered.

    python -m bench.idle [--seconds 60] [--storage s3] [--gaps 0 2 10] [--requests 20]

Runs the main job, `python -m infra.local up` (broker, S3 server, worker, bridge: what
`infra/local/run.sh` runs), on free ports with its own state directory, bucket and database,
every built model served, and waits until the bridge answers an inference. Then:

1. **idle CPU**: after `--settle` seconds without requests, each process's CPU (user + system,
   all threads, from /proc/<pid>/stat) over `--seconds`: `up` itself, worker, bridge, broker,
   S3 server. The issue's target: all of them together <= 0.05 cores.
2. **after a quiet spell**: per `--gaps` value G, `--requests` tiny requests through the bridge
   (OIP JSON over HTTP), each sent G seconds after the previous answer: p50 / p90 / max. G = 0
   is requests back to back (one at a time); a long G finds every consumer idle.

Everything it starts listens on 127.0.0.1; `up` is stopped by its PID (it stops what it started)
and the database dropped, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import aiohttp
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from bench import loadavg
from bench.e2e import process_cpu, py_spy
from infra.local import ROOT
from infra.local.harness import drop_database, isolated_settings, settings_env, tiny_input
from infra.local.stack import free_port
from streams.settings import Settings

RESULTS_DIR = ROOT / "bench" / "results"
READY_TIMEOUT_S = 180.0
INFER = "/v2/models/tiny/infer"
IDLE_TARGET_CORES = 0.05

console = Console(width=None if sys.stdout.isatty() else 160)


def children(pid: int) -> dict[str, int]:
    """The `inferstream <command>` processes whose parent is `pid`, by command."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rpartition(") ")[2].split()[1]) == pid and b"streams.cli" in argv:
            found[argv[argv.index(b"streams.cli") + 1].decode()] = int(entry.name)
    return found


def main_job_pids(up: subprocess.Popen, state_dir: Path) -> dict[str, int]:
    pids = {"up": up.pid, **children(up.pid)}
    for name in ("kafka", "s3"):
        pid_file = state_dir / "pids" / f"{name}.pid"
        if pid_file.exists():
            pids[name] = int(pid_file.read_text())
    return pids


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {name: process_cpu(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - started
    cores = {name: (process_cpu(pid) - before[name]) / elapsed for name, pid in pids.items()}
    cores["total"] = sum(cores.values())
    return cores


async def wait_answering(session: aiohttp.ClientSession, url: str, body: bytes, up: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    headers = {"Content-Type": "application/json", "X-Inferstream-Timeout": "3"}
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"the main job (python -m infra.local up) exited with {up.returncode}")
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {READY_TIMEOUT_S:.0f} s")


async def after_quiet(session: aiohttp.ClientSession, url: str, body: bytes, gap: float,
                      requests: int) -> dict:
    latencies = []
    for _ in range(requests):
        await asyncio.sleep(gap)
        started = time.perf_counter()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{url} answered {response.status}")
        latencies.append(time.perf_counter() - started)
    ms = np.array(latencies) * 1000
    return {"gap_s": gap, "requests": requests, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "max_ms": float(ms.max())}


async def measure(settings: Settings, up: subprocess.Popen, args: argparse.Namespace) -> dict:
    x = tiny_input(rows=1)["x"]
    body = orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.ravel().tolist()}]})
    url = f"http://{settings.bridge_host}:{settings.bridge_port}{INFER}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await wait_answering(session, url, body, up)
        console.log(f"answering; {args.settle:g} s without requests, then {args.seconds:g} s of CPU")
        await asyncio.sleep(args.settle)
        pids = main_job_pids(up, settings.state_dir)
        with contextlib.ExitStack() as profiles:
            for name in ("worker", "bridge") if args.profile_dir else ():
                profiles.enter_context(py_spy(pids[name], args.profile_dir / f"idle-{name}.txt"))
            cpu = await asyncio.to_thread(idle_cpu, pids, args.seconds)
        console.log("idle cores: " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))
        latency = []
        for gap in args.gaps:
            latency.append(await after_quiet(session, url, body, gap, args.requests))
            console.log(latency[-1])
    return {"pids": pids, "idle_cores": cpu, "after_quiet": latency}


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="inferstream-idle-") as state_dir:
        settings = isolated_settings(Path(state_dir), uuid.uuid4().hex[:8], bridge_port=free_port(),
                                     worker_web_port=free_port(), metrics_port=0)
        settings = settings.model_copy(update={"broker_storage": args.storage})
        log_path = Path(state_dir) / "up.log"
        env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        with log_path.open("ab") as log_file:
            up = subprocess.Popen([sys.executable, "-m", "infra.local", "up", "--no-build"], cwd=ROOT,
                                  env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return asyncio.run(measure(settings, up, args))
        except Exception:
            console.print(log_path.read_text(errors="replace")[-3000:])
            raise
        finally:
            if up.poll() is None:
                os.kill(up.pid, signal.SIGTERM)  # `up` stops the worker, bridge and stack it started
                try:
                    up.wait(60)
                except subprocess.TimeoutExpired:
                    os.kill(up.pid, signal.SIGKILL)
                    up.wait(10)
            asyncio.run(drop_database(settings.postgres_dsn))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle CPU sample")
    parser.add_argument("--settle", type=float, default=15.0, help="quiet seconds before sampling")
    parser.add_argument("--storage", default="s3", choices=["s3", "memory"], help="broker storage")
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 2.0, 10.0],
                        help="seconds of quiet before each request, one pass per value")
    parser.add_argument("--requests", type=int, default=20, help="requests per gap")
    parser.add_argument("--profile-dir", type=Path,
                        help="also py-spy the worker and the bridge during the CPU sample (pip install py-spy)")
    parser.add_argument("--json-out", type=Path,
                        default=RESULTS_DIR / f"idle-{datetime.now():%Y%m%d-%H%M%S}.json")
    args = parser.parse_args(argv)
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    load = {"before": loadavg.before_run(console)}
    figures = run(args)
    load["after"] = loadavg.load_average()
    cpu = figures["idle_cores"]
    table = Table(*cpu.keys(), title=f"main job idle, cores busy over {args.seconds:g} s "
                                     f"(broker storage {args.storage}; target total <= {IDLE_TARGET_CORES})")
    table.add_row(*(f"{v:.3f}" for v in cpu.values()))
    console.print(table)
    table = Table("quiet before each request s", "requests", "p50 ms", "p90 ms", "max ms",
                  title="tiny through the bridge, one request at a time")
    for row in figures["after_quiet"]:
        table.add_row(f"{row['gap_s']:g}", str(row["requests"]), f"{row['p50_ms']:.1f}",
                      f"{row['p90_ms']:.1f}", f"{row['max_ms']:.1f}")
    console.print(table)
    console.print(loadavg.summary(load["before"], load["after"]))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "timestamp": datetime.now().isoformat(timespec="seconds"), "storage": args.storage,
        "seconds": args.seconds, "loadavg": loadavg.record(load["before"], load["after"]), **figures,
    }, indent=2) + "\n")
    console.print(f"figures written to {args.json_out}")


if __name__ == "__main__":
    main()
