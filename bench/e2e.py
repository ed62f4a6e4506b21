"""End-to-end benchmark: raw onnxruntime in-process versus the whole Kafka path.

    python -m bench.e2e [--models tiny resnet18] [--tiny-requests N] [--resnet-requests N]

1. Baseline: OnnxModel (the worker's session options) called in this process, at the worker's
   batch size (and tiny at batch 1 too) on float32 rows; one request = one row. For an image
   model, also the CPU the worker spends preparing one image of the form the requests carry.
2. End to end: a private stack (Tansu in memory, SeaweedFS, PostgreSQL database) on free ports
   and one worker process; per model, N requests sent as fast as InferenceClient allows
   (requests → intake → model topic → inference → reply topic), timed to the last reply. Each
   model is probed with its own input until the worker answers it, so any model runs alone. An
   image model's requests carry a photo as users should send one (`--image-form`: a JPEG file by
   default, or its uint8 pixels, or the float32 tensor).
3. The Kafka floor, on the same broker once the worker is stopped: a plain aiokafka echo service
   (bench/floor.py) answering N requests of the pipeline's request and reply record sizes.
4. A table of the ratios (e2e/raw, e2e/floor) against the issue's targets, the box's load
   average before and after, and the figures as JSON in bench/results/.

Everything it starts is stopped by PID on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from bench import loadavg
from bench.floor import EchoService, FloorClient, create_topics, ratio
from bench.processes import private_stack, stopped_after
from infra.local import ROOT
from infra.local.harness import Worker, isolated_settings
from models.build import build_models
from streams.client import InferenceClient
from streams.kafka.admin import ensure_topics
from streams.registry.records import ModelInfo, ModelRegistry
from streams.serving.backends.grouping import concat_rows
from streams.serving.backends.onnx import OnnxModel
from streams.serving.images import decode_rows, encoded_tensor, image_to_tensor, load_image
from streams.settings import Settings
from topics import events
from topics.tensors import dtype_name

RESULTS_DIR = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_PROBES = 30  # sequential requests for the unloaded latency
WARM_CALLS = 3  # onnxruntime's first runs allocate and pick kernels
YIELD_EVERY = 64  # requests sent between two turns of the event loop
READY_TIMEOUT_S = 90.0  # until the worker answers a model (its consumers joined their groups)
PROBE_TIMEOUT_S = 5.0  # one readiness probe: a cold model's first batch may take seconds

# The targets: (what it asks, whether a model's figures meet it). tiny's is relative to
# the Kafka floor of the same run (>= 5,000 req/s on a quiet 2-core box), so a busy box moves
# both sides.
TINY_FLOOR_SHARE = 0.35
TARGETS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "resnet18": (">= 0.95x raw", lambda row: row["ratio"] >= 0.95),
    "tiny": (f">= {TINY_FLOOR_SHARE}x floor",
             lambda row: (row["floor_ratio"] or 0.0) >= TINY_FLOOR_SHARE),
}

# Piped output (CI, a log file) would otherwise wrap the tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)


# -- inputs and the in-process baseline ----------------------------------------------------


def model_inputs(info: ModelInfo, rows: int) -> dict[str, np.ndarray]:
    """Float32 rows for the graph's inputs (the raw baseline's)."""
    rng = np.random.default_rng(0)
    return {
        spec.name: rng.standard_normal((rows, *spec.shape[1:])).astype(spec.dtype)
        for spec in info.inputs
    }


IMAGE_FORMS = ("file", "pixels", "float32")


def photo_jpeg() -> bytes:
    """A 451x300 photo as a JPEG (quality 90, 35 KB): scikit-image's chelsea, else a gradient."""
    try:
        import skimage.data

        image = Image.open(Path(skimage.data.__file__).parent / "chelsea.png").convert("RGB")
    except ImportError:
        ramp = np.linspace(0, 255, 451, dtype=np.uint8)
        image = Image.fromarray(np.stack([np.tile(ramp, (300, 1))] * 3, axis=-1))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def request_inputs(info: ModelInfo, form: str) -> dict[str, np.ndarray]:
    """One request's inputs: an image model's photo in `form` (where the model takes that form),
    else float32 rows."""
    image = info.image_input
    name = {"file": image.encoded, "pixels": image.pixels, "float32": image.tensor}[form] if image else None
    if name is None:
        return model_inputs(info, rows=1)
    data, pre = photo_jpeg(), info.preprocessing or {}
    if form == "file":
        return {name: encoded_tensor([data])}
    if form == "pixels":
        pixels = decode_rows([data], pre)
        return {name: pixels if image.layout == "HWC" else pixels.transpose(0, 3, 1, 2)}  # type: ignore[union-attr]
    return {name: image_to_tensor(load_image(data), pre)}


def prep_cpu_us(model: OnnxModel, inputs: dict[str, np.ndarray], rows: int, seconds: float = 1.0) -> float:
    """CPU µs per request the worker spends turning `inputs` into the float32 input (decoding,
    normalising), in batches of `rows` such requests: work the raw baseline leaves out."""
    calls, started = 0, time.process_time()
    while calls < 2 or time.process_time() - started < seconds:
        prepared = [model.images.prepare(inputs) for _ in range(rows)]
        model.images.float_inputs(concat_rows([p for p in prepared if not isinstance(p, BaseException)]))
        calls += 1
    return (time.process_time() - started) / (calls * rows) * 1e6


def worker_batch(settings: Settings, info: ModelInfo) -> int:
    """The batch size the worker's micro-batcher fills (see Pipeline.start)."""
    return min(settings.max_batch_size, info.max_batch_size)


def raw_rate(model: OnnxModel, rows: int, seconds: float) -> tuple[float, float]:
    """Rows per second of back-to-back session runs on one pre-stacked batch, and the CPU µs
    each row cost (all of onnxruntime's threads)."""
    inputs = model_inputs(model.info, rows)
    for _ in range(WARM_CALLS):
        model.run(inputs)
    calls, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while calls < WARM_CALLS or time.perf_counter() - started < seconds:
        model.run(inputs)
        calls += 1
    count = calls * rows
    cpu_us = (time.process_time() - cpu_started) / count * 1e6
    return count / (time.perf_counter() - started), cpu_us


def raw_baselines(settings: Settings, registry: ModelRegistry, models: list[str],
                  seconds: float, form: str) -> list[dict]:
    baselines = []
    for name in models:
        info = registry.resolve(name)
        model = OnnxModel.from_settings(info, settings)
        # Rows per session call as the worker makes them: its batch, in calls of model.max_rows.
        batches = [min(worker_batch(settings, info), model.max_rows)] + ([1] if name == "tiny" else [])
        prep_us = prep_cpu_us(model, request_inputs(info, form), batches[0]) if info.image_input else 0.0
        for batch in batches:
            rate, cpu_us = raw_rate(model, batch, seconds)
            console.log(f"raw {name} batch {batch}: {rate:,.0f} req/s")
            # The targets compare against the worker-batch baseline (listed first).
            baselines.append({"model": name, "batch": batch, "raw_req_s": rate,
                              "raw_cpu_us": cpu_us, "prep_cpu_us": prep_us, "worker_batch": batch == batches[0]})
    return baselines


# -- CPU accounting ---------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(") ")[2].split()  # fields from the 3rd on: comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def box_busy_cpu() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process now (VmRSS) and at its peak so far (VmHWM), in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith(("VmRSS", "VmHWM")))
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_mb": int(fields["VmHWM"].split()[0]) / 1024}


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    snap = {name: process_cpu(pid) for name, pid in pids.items()}
    snap["client"] = time.process_time()
    snap["box"] = box_busy_cpu()
    return snap


def cpu_per_request(before: dict[str, float], after: dict[str, float], count: int,
                    seconds: float) -> dict[str, float]:
    """µs of CPU per request for each process; `other` is the rest of the box (PostgreSQL for
    the sink, mostly); `busy` is the share of all cores in use."""
    used = {name: after[name] - before[name] for name in before}
    box = used.pop("box")
    cpu = {name: seconds_used / count * 1e6 for name, seconds_used in used.items()}
    cpu["other"] = max(0.0, box - sum(used.values())) / count * 1e6
    cpu["busy"] = box / (seconds * (os.cpu_count() or 1))
    return cpu


def stack_pids(settings: Settings, worker: Worker | None) -> dict[str, int]:
    """The worker's and the stack's PIDs (LocalStack keeps them in state_dir/pids/)."""
    pids = {"worker": worker.proc.pid} if worker is not None and worker.proc is not None else {}
    for name in ("kafka", "s3"):
        pids[name] = int((settings.state_dir / "pids" / f"{name}.pid").read_text())
    return pids


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """Sample the worker's Python stacks (collapsed format) while the block runs."""
    if out is None:
        yield
        return
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # --nonblocking: sampling without pausing the worker, so the profile costs it little.
    proc = subprocess.Popen([binary, "record", "--nonblocking", "-r", "200", "-f", "raw",
                             "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- end to end -------------------------------------------------------------------------------


class SizedClient(InferenceClient):
    """InferenceClient noting the size of each record it produces and receives: the Kafka floor
    then sends records of the same sizes."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sent_bytes: list[int] = []
        self.received_bytes: list[int] = []

    async def produce(self, topic: str, key: bytes, value: bytes, **kwargs):  # type: ignore[override]
        self.sent_bytes.append(len(value))
        return await super().produce(topic, key, value, **kwargs)

    def _deliver(self, correlation: str, value: bytes) -> None:
        self.received_bytes.append(len(value))
        super()._deliver(correlation, value)

    def clear_sizes(self) -> None:
        self.sent_bytes.clear()
        self.received_bytes.clear()


async def wait_model_ready(client: InferenceClient, worker: Worker, model: str,
                           inputs: dict[str, np.ndarray]) -> None:
    """Until the worker answers `model` with its own input: no other model need be served."""
    deadline, last = time.monotonic() + READY_TIMEOUT_S, "no reply"
    while time.monotonic() < deadline:
        worker.check_running()
        try:
            result = await client.infer(model, inputs, timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            last = "no reply"
            continue
        if result.header.status == "ok":
            return
        last = f"error reply {result.header.error}"
        await asyncio.sleep(0.5)
    raise TimeoutError(f"worker not answering {model} after {READY_TIMEOUT_S:.0f} s ({last}):\n"
                       f"{worker.log()[-3000:]}")


def _stamp(arrivals: list[float], index: int, _future: asyncio.Future) -> None:
    arrivals[index] = time.perf_counter()


async def burst(client: InferenceClient, model: str, inputs: dict[str, np.ndarray], count: int,
                timeout: float) -> dict:
    """Send `count` requests back to back, await every reply; throughput and latencies."""
    sent, arrivals, waiters = [0.0] * count, [0.0] * count, []
    deadline = time.perf_counter() + timeout
    for i in range(count):
        request = client.request(model, timeout=timeout)
        sent[i] = time.perf_counter()
        waiter = await client.send(request, inputs)
        waiter.add_done_callback(partial(_stamp, arrivals, i))
        waiters.append(waiter)
        if i % YIELD_EVERY == 0:
            # client.send need not suspend: without this turn of the loop, a long send loop
            # would hold back the producer's sends and the reply reader until it ends.
            await asyncio.sleep(0)
    done, pending = await asyncio.wait(waiters, timeout=max(1.0, deadline - time.perf_counter()))
    if pending:
        raise TimeoutError(f"{model}: {len(done)} of {count} replies within {timeout:.0f} s")
    results = [w.result() for w in waiters]
    latencies = sorted(a - s for a, s in zip(arrivals, sent))
    ok = [r for r in results if r.header.status == "ok"]
    sample = ok[0] if ok else results[0]
    return {
        "reply_sample_bytes": len(events.encode_result(sample.header, sample.tensors)),
        "requests": count,
        "seconds": max(arrivals) - sent[0],
        "e2e_req_s": count / (max(arrivals) - sent[0]),
        "p50_ms": latencies[count // 2] * 1000,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1000,
        "errors": dict(Counter(r.header.error.code for r in results if r.header.error)),
        "mean_batch": statistics.fmean(r.header.batch_size for r in ok) if ok else 0.0,
    }


async def idle_latency(client: InferenceClient, model: str, inputs: dict[str, np.ndarray],
                       timeout: float) -> float:
    """Median round trip of one request at a time (no queue in front of it), in ms."""
    times = []
    for _ in range(IDLE_PROBES):
        started = time.perf_counter()
        await client.infer(model, inputs, timeout=timeout)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def median_size(sizes: list[int], fallback: int) -> int:
    return int(statistics.median(sizes)) if sizes else fallback


async def measure_model(client: SizedClient, worker: Worker, info: ModelInfo, count: int,
                        timeout: float, pids: dict[str, int], profile: Path | None, form: str) -> dict:
    inputs = request_inputs(info, form)
    console.log(f"{info.name} requests carry " + ", ".join(
        f"{n} {dtype_name(a)}{list(a.shape)}" for n, a in inputs.items()))
    await wait_model_ready(client, worker, info.name, inputs)
    loaded = memory_mb(pids["worker"])  # the model loaded and one request served
    await burst(client, info.name, inputs, max(1, count // 10), timeout)  # warm-up, not counted
    idle_ms = await idle_latency(client, info.name, inputs, timeout)
    before = cpu_snapshot(pids)
    client.clear_sizes()
    with py_spy(pids["worker"], profile):
        figures = await burst(client, info.name, inputs, count, timeout)
    figures["cpu_us"] = cpu_per_request(before, cpu_snapshot(pids), count, figures["seconds"])
    figures["idle_p50_ms"] = idle_ms
    figures["worker_memory_mb"] = {"loaded": loaded, "after": memory_mb(pids["worker"])}
    figures["inputs"] = {n: f"{dtype_name(a)}{list(a.shape)}" for n, a in inputs.items()}
    figures["image_form"] = form if info.image_input else None
    # Record sizes on Kafka (a claim-checked input travels through S3, not in the record).
    figures["request_bytes"] = median_size(client.sent_bytes, 0)
    figures["reply_bytes"] = median_size(client.received_bytes, figures.pop("reply_sample_bytes"))
    console.log(f"e2e {info.name}: {figures['e2e_req_s']:,.0f} req/s over "
                f"{figures['seconds']:.1f} s, p50 {figures['p50_ms']:.0f} ms")
    if figures["errors"]:
        console.log(f"[red]{info.name}: error replies {figures['errors']}[/red]")
    return figures


async def end_to_end(settings: Settings, worker: Worker, registry: ModelRegistry,
                     counts: dict[str, int], timeout: float, profile_dir: Path | None, form: str) -> dict:
    pids = stack_pids(settings, worker)
    async with SizedClient(settings) as client:
        return {
            name: await measure_model(
                client, worker, registry.resolve(name), count, timeout, pids,
                profile_dir / f"{name}.txt" if profile_dir else None, form,
            )
            for name, count in counts.items()
        }


async def floor_pass(settings: Settings, echo: EchoService, topic: str, reply_topic: str,
                     request_bytes: int, count: int, timeout: float,
                     pids: dict[str, int]) -> dict:
    value = b"q" * request_bytes
    async with FloorClient(settings, topic, reply_topic) as client:
        await client.wait_ready(echo, value)
        await client.burst(value, max(1, count // 10), timeout)  # warm-up, not counted
        before = cpu_snapshot(pids)
        figures = await client.burst(value, count, timeout)
        figures["cpu_us"] = cpu_per_request(before, cpu_snapshot(pids), count, figures["seconds"])
    return figures


def kafka_floor(settings: Settings, name: str, e2e: dict, timeout: float) -> dict:
    """The plain aiokafka echo service with `name`'s record sizes, on the same broker."""
    tag = uuid.uuid4().hex[:6]
    topic, reply_topic = (f"{settings.topic_prefix}.floor{tag}.{kind}" for kind in ("requests", "replies"))
    asyncio.run(create_topics(settings, topic, reply_topic))
    echo = EchoService(settings, topic, reply_topic, e2e["reply_bytes"],
                       settings.state_dir / f"floor-{name}.log")
    with stopped_after(console, echo):
        echo.start()
        assert echo.proc is not None
        pids = {"echo": echo.proc.pid, "kafka": stack_pids(settings, None)["kafka"]}
        figures = asyncio.run(floor_pass(settings, echo, topic, reply_topic, e2e["request_bytes"],
                                         e2e["requests"], timeout, pids))
    figures.update(request_bytes=e2e["request_bytes"], reply_bytes=e2e["reply_bytes"])
    console.log(f"floor {name}: {figures['req_s']:,.0f} req/s over {figures['seconds']:.1f} s "
                f"({figures['request_bytes']:,} B requests, {figures['reply_bytes']:,} B replies)")
    return figures


def run_on_private_stack(settings: Settings, registry: ModelRegistry, counts: dict[str, int],
                         timeout: float, profile_dir: Path | None, form: str) -> tuple[dict, dict]:
    worker = Worker(settings, settings.state_dir / "worker.log")
    with private_stack(settings, console, worker):
        asyncio.run(ensure_topics(settings, list(counts)))
        worker.start()
        console.log(f"worker pid {worker.proc.pid}, broker {settings.kafka_bootstrap}, "
                    f"database {settings.postgres_dsn.rpartition('/')[2]}")
        e2e = asyncio.run(end_to_end(settings, worker, registry, counts, timeout, profile_dir, form))
        worker.stop()  # the floor has the broker to itself, as the pipeline had
        floors = {name: kafka_floor(settings, name, figures, timeout) for name, figures in e2e.items()}
    return e2e, floors


# -- report -----------------------------------------------------------------------------------


def rows(baselines: list[dict], e2e: dict, floors: dict) -> list[dict]:
    """One row per baseline, beside its model's end-to-end figures, Kafka floor and target."""
    table = []
    for base in baselines:
        figures = e2e[base["model"]]
        floor_req_s = floors.get(base["model"], {}).get("req_s")
        row = {**base, **figures, "ratio": figures["e2e_req_s"] / base["raw_req_s"],
               "floor_req_s": floor_req_s, "floor_ratio": ratio(figures["e2e_req_s"], floor_req_s)}
        target = TARGETS.get(base["model"]) if base["worker_batch"] else None
        row["target"] = target[0] if target else None
        row["met"] = target[1](row) if target else None
        table.append(row)
    return table


def print_tables(table: list[dict], floors: dict, load: dict) -> None:
    ratios = Table("model", "raw batch", "raw req/s", "e2e req/s", "e2e/raw", "floor req/s",
                   "e2e/floor", "p50 ms", "p99 ms", "idle p50 ms", "target", "met",
                   title="Throughput: in-process onnxruntime vs end to end through Kafka vs the "
                   "Kafka floor (plain aiokafka echo, same broker, same record sizes)",
                   caption=loadavg.summary(load["before"], load["after"]))
    for r in table:
        met = "-" if r["met"] is None else ("[green]met[/green]" if r["met"] else "[red]not met[/red]")
        floor_cells = ((f"{r['floor_req_s']:,.0f}", f"{r['floor_ratio']:.2g}x")
                       if r["floor_req_s"] else ("-", "-"))
        ratios.add_row(r["model"], str(r["batch"]), f"{r['raw_req_s']:,.0f}",
                       f"{r['e2e_req_s']:,.0f}", f"{r['ratio']:.2g}x", *floor_cells,
                       f"{r['p50_ms']:,.0f}", f"{r['p99_ms']:,.0f}", f"{r['idle_p50_ms']:.1f}",
                       r["target"] or "-", met)
    console.print(ratios)
    sizes = Table("model", "request B", "reply B", "floor req/s", "floor p50 ms", "floor p99 ms",
                  title="Kafka floor: record sizes on Kafka (a claim-checked input travels "
                  "through S3, outside the floor)")
    for name, f in floors.items():
        sizes.add_row(name, f"{f['request_bytes']:,}", f"{f['reply_bytes']:,}", f"{f['req_s']:,.0f}",
                      f"{f['p50_ms']:,.0f}", f"{f['p99_ms']:,.0f}")
    console.print(sizes)
    cpu = Table("model", "raw onnxruntime", "image prep", "worker", "broker", "s3", "client", "other",
                "cores busy", "mean batch", title="CPU µs per request (end-to-end pass; raw: "
                "the in-process baseline; image prep: the worker's decoding and normalising of one "
                "request's image, in-process)")
    for r in (r for r in table if r["worker_batch"]):
        c = r["cpu_us"]
        cpu.add_row(r["model"], _us(r["raw_cpu_us"]), _us(r["prep_cpu_us"]) if r["prep_cpu_us"] else "-",
                    *(_us(c[k]) for k in ("worker", "kafka", "s3", "client", "other")),
                    f"{c['busy']:.0%}", f"{r['mean_batch']:.1f}")
        if r["model"] in floors:  # the echo service in the worker's column
            c = floors[r["model"]]["cpu_us"]
            cpu.add_row(f"{r['model']} floor", "-", "-", _us(c["echo"]), _us(c["kafka"]), "-",
                        _us(c["client"]), _us(c["other"]), f"{c['busy']:.0%}", "-")
    console.print(cpu)
    memory = Table("model", "RSS loaded MB", "RSS after MB", "peak MB",
                   title="Worker memory: once it answers the model (loaded), after the pass, and its peak")
    for r in (r for r in table if r["worker_batch"]):
        m = r["worker_memory_mb"]
        memory.add_row(r["model"], f"{m['loaded']['rss_mb']:,.0f}", f"{m['after']['rss_mb']:,.0f}",
                       f"{m['after']['peak_mb']:,.0f}")
    console.print(memory)


def _us(value: float) -> str:
    return f"{value:.2f}" if value < 1 else f"{value:,.0f}"


def write_json(path: Path, settings: Settings, baselines: list[dict], e2e: dict,
               floors: dict, table: list[dict], load: dict, form: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    knobs = ("max_batch_size", "max_batch_delay_ms", "take_max", "max_inflight",
             "onnx_intra_op_threads", "onnx_cpu_mem_arena", "onnx_allow_spinning", "claim_check_bytes")
    document = {
        "timestamp": datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg": loadavg.record(load["before"], load["after"]),
        "settings": {k: getattr(settings, k) for k in knobs},
        "image_form": form,
        "raw": baselines,
        "e2e": e2e,
        "floor": floors,
        "e2e_over_floor": {name: ratio(e2e[name]["e2e_req_s"], f["req_s"])
                           for name, f in floors.items()},
        "targets": {r["model"]: {"target": r["target"], "met": r["met"]}
                    for r in table if r["target"]},
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"figures written to {path}")


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "resnet18"])
    parser.add_argument("--tiny-requests", type=int, default=10_000)
    parser.add_argument("--resnet-requests", type=int, default=400,
                        help="requests per pass for every model but tiny")
    parser.add_argument("--raw-seconds", type=float, default=5.0,
                        help="duration of each in-process baseline")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a pass may take (also each request's deadline)")
    parser.add_argument("--json-out", type=Path,
                        default=RESULTS_DIR / f"e2e-{datetime.now():%Y%m%d-%H%M%S}.json")
    parser.add_argument("--image-form", choices=IMAGE_FORMS, default="file",
                        help="how an image model's requests carry their photo: the JPEG file (default), its "
                        "uint8 pixels, or the float32 tensor")
    parser.add_argument("--profile-dir", type=Path,
                        help="record the worker with py-spy during each pass (collapsed stacks)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM raises KeyboardInterrupt at once, like a second Ctrl-C, and unwinds through the
    # finally blocks that stop the worker and the stack. Not a task cancellation: Python 3.11's
    # asyncio.wait_for (in the client) can swallow one.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load = {"before": loadavg.before_run(console)}
    base = Settings()
    build_models(base.model_repository, args.models)
    registry = ModelRegistry.load(base.model_repository, args.models)
    counts = {m: args.tiny_requests if m == "tiny" else args.resnet_requests for m in args.models}
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    baselines = raw_baselines(base, registry, args.models, args.raw_seconds, args.image_form)
    with tempfile.TemporaryDirectory(prefix="inferstream-bench-") as state_dir:
        run = uuid.uuid4().hex[:8]
        # Own topic prefix and app id: Redis (shared with the machine) keys its entries by them.
        settings = isolated_settings(Path(state_dir), run, topic_prefix=f"bench{run}",
                                     app_id=f"bench-{run}", model_repository=base.model_repository,
                                     models=args.models)
        e2e, floors = run_on_private_stack(settings, registry, counts, args.timeout,
                                           args.profile_dir, args.image_form)
    load["after"] = loadavg.load_average()
    table = rows(baselines, e2e, floors)
    print_tables(table, floors, load)
    write_json(args.json_out, settings, baselines, e2e, floors, table, load, args.image_form)


if __name__ == "__main__":
    main()
