"""HTTP benchmark: the bridge versus tritonserver on the tiny model, over the same client.

    python -m bench.bridge [--seconds 10] [--concurrency 64] [--rates 50 100 200 400]

1. Floor: onnxruntime in this process (OnnxModel), one request (batch 1) per call.
2. The bridge: a private stack (Tansu in memory, SeaweedFS, a fresh PostgreSQL database) on free
   ports, one worker and one bridge process; Open Inference Protocol JSON over HTTP.
3. tritonserver (when .venv-triton exists, see infra/triton/setup.sh): the same model through
   PyTriton with its dynamic batcher, the same requests from the same client code.
Each HTTP target gets a saturated pass (N connections, closed loop) and fixed request rates
(open loop: sends on a clock, latency counted from the scheduled send). A table against the
targets, and the figures as JSON in bench/results/.

Everything it starts listens on 127.0.0.1 and is stopped by PID on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Self

import aiohttp
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from bench import loadavg
from bench.e2e import box_busy_cpu
from bench.processes import private_stack, stopped_after
from infra.local import ROOT
from infra.local.harness import (
    BridgeProcess,
    Worker,
    isolated_settings,
    tiny_input,
)
from infra.local.stack import free_port
from infra.local.triton_server import TritonServer, triton_available
from models.build import build_models
from streams.kafka.admin import ensure_topics
from streams.registry.records import ModelRegistry
from streams.serving.backends.onnx import OnnxModel
from streams.settings import Settings

MODEL = "tiny"
RESULTS_DIR = ROOT / "bench" / "results"
INFER_PATH = f"/v2/models/{MODEL}/infer"
JSON_HEADERS = {"Content-Type": "application/json"}
WARM_UP_S = 2.0  # a short saturated pass before measuring, not counted
READY_TIMEOUT_S = 90.0  # until the worker answers through the bridge (its consumers joined)
BACKGROUND_SAMPLE_S = 2.0
NOISY_CORES = 0.3  # background load above this many busy cores makes the figures suspect
MAX_CONNECTIONS = 512  # the open-loop passes' bound on sockets, should a target stall

# The targets, each read from one target's figures.
SATURATED_RATIO_TARGET = 1.0  # bridge saturated req/s >= 1.0x tritonserver's
P99_TARGET_MS, P99_TARGET_RATE = 20.0, 200  # bridge p99 <= 20 ms at 200 req/s

console = Console(width=None if sys.stdout.isatty() else 170)


# -- load shapes --------------------------------------------------------------------------------


def request_body(x: np.ndarray) -> bytes:
    """One OIP JSON infer request, encoded once: both targets get the very same bytes."""
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return orjson.dumps({"inputs": [tensor]})


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> int | str:
    """The HTTP status, or the name of the client error (timeouts included)."""
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


def latency_figures(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99)}


class CpuMeter:
    """This process's CPU and the whole box's over a block: is the client or the box the limit?"""

    def __enter__(self) -> Self:
        self._wall, self._client, self._box = time.perf_counter(), time.process_time(), box_busy_cpu()
        return self

    def __exit__(self, *_) -> None:
        wall = time.perf_counter() - self._wall
        self.client_cores = (time.process_time() - self._client) / wall
        self.box_cores = (box_busy_cpu() - self._box) / wall


async def saturate(session: aiohttp.ClientSession, url: str, body: bytes, connections: int,
                   seconds: float) -> dict:
    """`connections` closed loops, each sending its next request when its reply is in."""
    latencies: list[float] = []
    errors: Counter = Counter()
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        while (started := time.perf_counter()) < deadline:
            outcome = await post(session, url, body)
            if outcome == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors[str(outcome)] += 1

    started = time.perf_counter()
    with CpuMeter() as cpu:
        await asyncio.gather(*(loop() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"connections": connections, "seconds": elapsed, "ok": len(latencies),
            "req_s": len(latencies) / elapsed, **latency_figures(latencies),
            "errors": dict(errors), "client_cores": cpu.client_cores, "box_cores": cpu.box_cores}


async def fixed_rate(session: aiohttp.ClientSession, url: str, body: bytes, rate: float,
                     seconds: float) -> dict:
    """Open loop: request i is due at start + i/rate, whether or not earlier ones came back.

    Latency counts from the due time, so a client or server that falls behind shows as latency
    instead of silently lowering the rate (coordinated omission).
    """
    latencies: list[float] = []
    errors: Counter = Counter()
    last_reply = 0.0

    async def one(due: float) -> None:
        nonlocal last_reply
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        outcome = await post(session, url, body)
        last_reply = time.perf_counter()
        if outcome == 200:
            latencies.append(last_reply - due)
        else:
            errors[str(outcome)] += 1

    start = time.perf_counter() + 0.05  # time to create the tasks before the first is due
    with CpuMeter() as cpu:
        await asyncio.gather(*(one(start + i / rate) for i in range(int(rate * seconds))))
    return {"rate": rate, "ok": len(latencies),
            "achieved_req_s": len(latencies) / max(last_reply - start, 1e-9),
            **latency_figures(latencies), "errors": dict(errors),
            "client_cores": cpu.client_cores, "box_cores": cpu.box_cores}


async def triton_batches(session: aiohttp.ClientSession, base: str) -> tuple[int, int] | None:
    """(rows inferred, model executions) from Triton's statistics; None where there are none
    (the bridge has no such endpoint)."""
    async with session.get(f"{base}/v2/models/{MODEL}/stats") as response:
        if response.status != 200:
            return None
        stats = (await response.json())["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


async def wait_answering(session: aiohttp.ClientSession, url: str, body: bytes) -> bytes:
    """Until the target answers 200 (the bridge's worker may still be joining its groups)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    # A short deadline per try: a request the worker never sees would wait the bridge's 30 s.
    headers = {**JSON_HEADERS, "X-Inferstream-Timeout": "3"}
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.post(url, data=body, headers=headers) as response:
                if response.status == 200:
                    return await response.read()
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {READY_TIMEOUT_S:.0f} s")


def check_answer(answer: bytes, expected: np.ndarray) -> None:
    (output,) = orjson.loads(answer)["outputs"]
    np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(expected.shape),
                               expected, rtol=1e-5, atol=1e-6)


async def load(name: str, base: str, x: np.ndarray, expected: np.ndarray,
               args: argparse.Namespace) -> dict:
    """Every load shape against one target (base = http://host:port)."""
    url, body = f"{base}{INFER_PATH}", request_body(x)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=max(MAX_CONNECTIONS, args.concurrency))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        check_answer(await wait_answering(session, url, body), expected)
        await saturate(session, url, body, args.concurrency, WARM_UP_S)
        before = await triton_batches(session, base)
        figures = {"saturated": await saturate(session, url, body, args.concurrency, args.seconds)}
        after = await triton_batches(session, base)
        if before and after:
            rows, executions = (a - b for a, b in zip(after, before))
            figures["saturated"]["mean_batch"] = rows / max(executions, 1)
        console.log(f"{name} saturated: {figures['saturated']['req_s']:,.0f} req/s")
        figures["rates"] = []
        for rate in args.rates:
            figures["rates"].append(await fixed_rate(session, url, body, rate, args.seconds))
            r = figures["rates"][-1]
            console.log(f"{name} at {rate:g} req/s: achieved {r['achieved_req_s']:,.0f}, "
                        f"p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} ms")
    return figures


# -- targets ------------------------------------------------------------------------------------


def floor(model: OnnxModel, x: np.ndarray, seconds: float) -> dict:
    """onnxruntime in this process, one request (batch 1) per call, back to back."""
    inputs = {"x": x}
    model.run(inputs)  # the first run allocates
    latencies = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        call = time.perf_counter()
        model.run(inputs)
        latencies.append(time.perf_counter() - call)
    elapsed = time.perf_counter() - started
    console.log(f"floor: {len(latencies) / elapsed:,.0f} calls/s")
    return {"saturated": {"req_s": len(latencies) / elapsed, **latency_figures(latencies)},
            "rates": []}


def bridge(settings: Settings, x: np.ndarray, expected: np.ndarray,
           args: argparse.Namespace) -> dict:
    worker = Worker(settings, settings.state_dir / "worker.log")
    bridge_process = BridgeProcess(settings, settings.state_dir / "bridge.log",
                                   bridge_port=free_port())
    with private_stack(settings, console, worker, bridge_process):
        asyncio.run(ensure_topics(settings, [MODEL]))
        worker.start()
        bridge_process.start()
        asyncio.run(bridge_process.wait_ready())
        console.log(f"bridge on {bridge_process.url}, worker pid {worker.proc.pid}")
        return asyncio.run(load("bridge", bridge_process.url, x, expected, args))


def tritonserver(repository: Path, log_path: Path, x: np.ndarray, expected: np.ndarray,
                 args: argparse.Namespace) -> dict:
    server = TritonServer(repository, [MODEL], log_path)
    with stopped_after(console, server):
        server.start()
        server.wait_ready()
        console.log(f"tritonserver on {server.http_url}, pid {server.proc.pid}")
        return asyncio.run(load("tritonserver", f"http://{server.http_url}", x, expected, args))


def background_cores(seconds: float = BACKGROUND_SAMPLE_S) -> float:
    """Cores busy while this benchmark runs nothing: other work on the machine."""
    before = box_busy_cpu()
    time.sleep(seconds)
    return (box_busy_cpu() - before) / seconds


# -- report -------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _mark(met: bool) -> str:
    return "[green]met[/green]" if met else "[red]not met[/red]"


def targets_met(results: dict) -> dict:
    bridge_figures, triton_figures = results.get("bridge"), results.get("tritonserver")
    met = {}
    if bridge_figures and triton_figures:
        ratio = bridge_figures["saturated"]["req_s"] / triton_figures["saturated"]["req_s"]
        met["saturated_vs_tritonserver"] = {"target": f">= {SATURATED_RATIO_TARGET:.1f}x",
                                            "value": ratio, "met": ratio >= SATURATED_RATIO_TARGET}
    at_rate = [r for r in (bridge_figures or {}).get("rates", []) if r["rate"] == P99_TARGET_RATE]
    if at_rate:
        p99 = at_rate[0]["p99_ms"]
        met[f"p99_at_{P99_TARGET_RATE}"] = {"target": f"<= {P99_TARGET_MS:g} ms",
                                             "value": p99,
                                             "met": p99 is not None and p99 <= P99_TARGET_MS
                                             and not at_rate[0]["errors"]}
    return met


def print_table(results: dict, rates: list[float], met: dict, background: list[float],
                load: dict) -> None:
    table = Table("target", "saturated req/s", "vs triton", "sat. p50 / p99 ms",
                  "cores busy (client)", *(f"{r:g}/s: got, p50 / p99 ms" for r in rates),
                  title=f"{MODEL}: HTTP inference, bridge vs tritonserver "
                  f"({os.cpu_count()} cores, client on the same box)")
    triton_rate = results.get("tritonserver", {}).get("saturated", {}).get("req_s")
    for name, figures in results.items():
        sat = figures["saturated"]
        ratio = f"{sat['req_s'] / triton_rate:.2f}x" if triton_rate else "-"
        if name == "bridge" and "saturated_vs_tritonserver" in met:
            ratio += " " + _mark(met["saturated_vs_tritonserver"]["met"])
        cores = (f"{sat['box_cores']:.2f} ({sat['client_cores']:.2f})" if "box_cores" in sat
                 else "-")
        cells = {r["rate"]: _rate_cell(r) for r in figures["rates"]}
        if name == "bridge" and f"p99_at_{P99_TARGET_RATE}" in met:
            cells[P99_TARGET_RATE] += " " + _mark(met[f"p99_at_{P99_TARGET_RATE}"]["met"])
        latency = f"{_ms(sat['p50_ms'])} / {_ms(sat['p99_ms'])}"
        if sat.get("errors"):
            latency += f" [red]errors {sat['errors']}[/red]"
        table.add_row(name, f"{sat['req_s']:,.0f}", ratio, latency, cores,
                      *(cells.get(r, "-") for r in rates))
    console.print(table)
    console.print(f"targets: bridge saturated >= {SATURATED_RATIO_TARGET:.1f}x tritonserver; "
                  f"bridge p99 <= {P99_TARGET_MS:g} ms at {P99_TARGET_RATE} req/s (no errors)")
    if "mean_batch" in results.get("tritonserver", {}).get("saturated", {}):
        console.print(f"tritonserver's mean batch when saturated: "
                      f"{results['tritonserver']['saturated']['mean_batch']:.1f}")
    busy = max(background)
    note = " [red]noisy: other work was running, read the figures with care[/red]" \
        if busy > NOISY_CORES else ""
    console.print(f"background load (before/after): "
                  f"{' / '.join(f'{b:.2f}' for b in background)} cores busy{note}")
    console.print(loadavg.summary(load["before"], load["after"]))


def _rate_cell(figures: dict) -> str:
    cell = (f"{figures['achieved_req_s']:,.0f}, "
            f"{_ms(figures['p50_ms'])} / {_ms(figures['p99_ms'])}")
    if figures["errors"]:
        cell += f" [red]errors {figures['errors']}[/red]"
    return cell


def write_json(path: Path, args: argparse.Namespace, settings: Settings, results: dict,
               met: dict, background: list[float], load: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "timestamp": datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "model": MODEL,
        "load": {"seconds": args.seconds, "concurrency": args.concurrency, "rates": args.rates,
                 "request_timeout_s": args.request_timeout, "body": "OIP JSON, [1,16] FP32"},
        "worker_settings": {k: getattr(settings, k) for k in (
            "max_batch_size", "max_batch_delay_ms", "onnx_intra_op_threads")},
        "background_cores_busy": background,
        "loadavg": loadavg.record(load["before"], load["after"]),
        "results": results,
        "targets": met,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"figures written to {path}")


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bridge",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of the saturated pass and of each fixed-rate pass")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="connections in the saturated pass")
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 400],
                        help="requests per second of the open-loop passes")
    parser.add_argument("--floor-seconds", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=10.0,
                        help="client bound on each request, seconds")
    parser.add_argument("--no-triton", action="store_true", help="skip tritonserver")
    parser.add_argument("--json-out", type=Path,
                        default=RESULTS_DIR / f"bridge-{datetime.now():%Y%m%d-%H%M%S}.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM unwind through the finally blocks that stop what was started (SIGINT
    # reset: shells start background jobs with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    load = {"before": loadavg.before_run(console)}
    base = Settings()
    build_models(base.model_repository, [MODEL])
    info = ModelRegistry.load(base.model_repository, [MODEL]).resolve(MODEL)
    model = OnnxModel(info, base.onnx_intra_op_threads)
    x = tiny_input(rows=1)["x"]
    expected = model.run({"x": x})["y"]
    background = [background_cores()]
    results = {"onnxruntime (floor)": floor(model, x, args.floor_seconds)}
    with tempfile.TemporaryDirectory(prefix="inferstream-bench-") as state_dir:
        settings = isolated_settings(Path(state_dir), uuid.uuid4().hex[:8],
                                     model_repository=base.model_repository, models=[MODEL])
        results["bridge"] = bridge(settings, x, expected, args)
        if args.no_triton:
            console.log("tritonserver skipped (--no-triton)")
        elif triton_available():
            results["tritonserver"] = tritonserver(base.model_repository,
                                                   Path(state_dir) / "triton.log", x, expected,
                                                   args)
        else:
            console.log("[yellow]tritonserver skipped: .venv-triton is missing "
                        "(run infra/triton/setup.sh)[/yellow]")
    background.append(background_cores())
    load["after"] = loadavg.load_average()
    met = targets_met(results)
    print_table(results, args.rates, met, background, load)
    write_json(args.json_out, args, settings, results, met, background, load)


if __name__ == "__main__":
    main()
