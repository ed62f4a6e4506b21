"""Requests: one inference and its stored result (`infer`, `result`), a load at a fixed rate or
in stages, with thresholds (`load`), and stored requests published again (`replay`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from streams.cli.common import CommandGroup, console, error, fail, get_settings, refusing
from streams.cli.stores import with_stores

if TYPE_CHECKING:
    import numpy as np

app = CommandGroup()


def _parse_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    import numpy as np

    inputs = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            fail(f"--input takes NAME=FILE.npy, got {spec!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            fail(f"--input {name}: cannot read {path} as a .npy array ({type(exc).__name__})")
    return inputs


@app.command()
def infer(
    model: Annotated[str, typer.Option(help="model name")],
    image: Annotated[Optional[Path], typer.Option(help="image file (image models)")] = None,
    input: Annotated[Optional[list[str]], typer.Option(help="NAME=FILE.npy (repeatable)")] = None,
    version: Annotated[Optional[str], typer.Option(help="pin a model version")] = None,
    top_k: Annotated[int, typer.Option(help="labels to show for image models")] = 5,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the reply")] = 30.0,
    api_key: Annotated[Optional[str], typer.Option(envvar="INFERSTREAM_API_KEY", help="an API key")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="INFERSTREAM_TOKEN", help="a JWT bearer token")] = None,
) -> None:
    """Produce one request event, wait for its reply and print the prediction."""
    from streams.client import InferenceClient
    from streams.registry.records import ModelRegistry
    from streams.serving.images import ImageError, load_labels, probabilities
    from streams.serving.images import top_k as best
    from topics.errors import EventError
    from topics.events import Credentials

    settings = get_settings()
    try:
        info = ModelRegistry.load(settings.model_repository).resolve(model, version)
    except EventError as exc:
        fail(exc.message)
    if image is not None:
        if not info.preprocessing:
            fail(f"model {model} takes no images")
        try:
            # The file itself where the model takes image files (the worker decodes it).
            inputs = info.image_file_inputs(image.read_bytes())
        except OSError as exc:
            fail(f"--image {image}: {exc.strerror or type(exc).__name__}")
        except ImageError as exc:
            fail(f"--image {image}: {exc}")
    elif input:
        inputs = _parse_inputs(input)
    else:
        fail("give --image or --input")

    credentials = Credentials(api_key=api_key, authorization=f"Bearer {token}" if token else None)

    async def call():
        async with InferenceClient(settings) as client:
            result = await client.infer(model, inputs, version=version, timeout=timeout,
                                        credentials=credentials if api_key or token else None)
            return result, await client.outputs(result) if result.header.status == "ok" else {}

    try:
        result, outputs = asyncio.run(call())
    except TimeoutError as exc:
        fail(str(exc))
    header = result.header
    if header.error:
        fail(f"{header.error.code}: {header.error.message}")
    console.print(
        f"request {header.request_id}: {header.model} v{header.model_version}, "
        f"timings {header.timings_ms}"
    )
    labels = load_labels(info.model_dir, info.model_dump())
    if labels:
        probs = probabilities(outputs[info.outputs[0].name], info.postprocessing)[0]
        table = Table("rank", "class", "label", "probability")
        for rank, (index, label, p) in enumerate(best(probs, labels, top_k), start=1):
            table.add_row(str(rank), str(index), label, f"{p:.4f}")
        console.print(table)
    else:
        for name, array in outputs.items():
            console.print(f"{name} {array.dtype}{list(array.shape)}:\n{array}")


@app.command()
def result(request_id: Annotated[str, typer.Argument(help="the request's id")]) -> None:
    """Show the stored result of a request (PostgreSQL)."""
    row = with_stores(lambda stores: stores.results.get(request_id))
    if row is None:
        fail(f"no result for {request_id}")
    for key, value in dict(row).items():
        console.print(f"{key:>16}: {f'<{len(value)} bytes>' if isinstance(value, bytes) else value}")


THRESHOLD_BROKEN = 1  # the exit status of a load run that broke a threshold (2 stays a refused command)


@app.command("load")
def load_command(
    target: Annotated[str, typer.Option(help="bridge (HTTP, Open Inference Protocol), classify (HTTP, an image"
                                             " to /v1/models/MODEL/classify) or kafka (InferenceClient)")]
    = "bridge",
    url: Annotated[Optional[str], typer.Option(help="bridge base URL (default: the settings' bridge)")] = None,
    rate: Annotated[Optional[float], typer.Option(help="requests per second, started on schedule (open loop);"
                                                       " default 50")] = None,
    duration: Annotated[Optional[float], typer.Option(help="seconds measured at --rate; default 10")] = None,
    stages: Annotated[Optional[str], typer.Option(help="instead of --rate/--duration: DURATION:RATE,... linear"
                                                       " ramps from 0 req/s, e.g. 10s:50,30s:50,10s:0")] = None,
    warmup: Annotated[float, typer.Option(help="seconds at --rate before, not counted")] = 0.0,
    model: Annotated[str, typer.Option(help="model name")] = "tiny",
    version: Annotated[Optional[str], typer.Option(help="pin a model version (bridge, kafka)")] = None,
    shape: Annotated[Optional[list[str]], typer.Option(help="[NAME=]D1,D2,... input shape (repeatable)")] = None,
    image: Annotated[Optional[Path], typer.Option(help="the image file each request sends (classify)")] = None,
    max_inflight: Annotated[int, typer.Option(min=1, help="requests in flight at most; a due request over it"
                                                          " is dropped")] = 1000,
    timeout: Annotated[float, typer.Option(help="seconds each request may take (its deadline)")] = 10.0,
    max_error_rate: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="threshold: share (0..1) of requests not answered ok, dropped included")] = None,
    p95_ms: Annotated[Optional[float], typer.Option(min=0.0, help="threshold: latency p95 of ok requests")] = None,
    p99_ms: Annotated[Optional[float], typer.Option(min=0.0, help="threshold: latency p99 of ok requests")] = None,
    min_rate: Annotated[Optional[float], typer.Option(min=0.0, help="threshold: achieved ok replies per second")]
    = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="INFERSTREAM_API_KEY", help="an API key")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="INFERSTREAM_TOKEN", help="a JWT bearer token")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random inputs")] = 0,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="also write the figures here")] = None,
) -> None:
    """Drive the bridge, its classify route or the Kafka ingress at a fixed rate or in stages (open loop);
    counts each second, then figures, then the thresholds: exit status 1 when one is broken."""
    import json
    import mimetypes
    from dataclasses import asdict

    from aiokafka.errors import KafkaError

    from streams.ops import load as load_gen
    from topics.errors import EventError

    if target not in ("bridge", "classify", "kafka"):
        fail(f"--target is bridge, classify or kafka, got {target!r}")
    if stages is not None and (rate is not None or duration is not None or warmup):
        fail("--stages replaces --rate, --duration and --warmup (a ramp-up stage warms up)")
    if target == "classify" and (image is None or version or shape):
        fail("--target classify sends the --image file (and takes no --version or --shape)")
    if target != "classify" and image is not None:
        fail("--image is for --target classify")
    thresholds = load_gen.Thresholds(max_error_rate=max_error_rate, p95_ms=p95_ms, p99_ms=p99_ms, min_rate=min_rate)
    try:
        plan = ({"stages": load_gen.parse_stages(stages)} if stages is not None
                else {"rate": 50.0 if rate is None else rate, "duration": 10.0 if duration is None else duration,
                      "warmup": warmup})
        shapes = load_gen.parse_shapes(shape or [])
        driver: load_gen.Target
        if target == "kafka":
            driver = load_gen.KafkaTarget(get_settings(), model, version=version, timeout=timeout, shapes=shapes,
                                          api_key=api_key, token=token, seed=seed)
        else:
            if url is None:
                settings = get_settings()
                url = f"http://{settings.bridge_host}:{settings.bridge_port}"
            if image is None:  # checked above: given exactly for classify
                driver = load_gen.BridgeTarget(url, model, version=version, timeout=timeout, shapes=shapes,
                                               api_key=api_key, token=token, max_connections=max_inflight,
                                               seed=seed)
            else:
                content_type = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
                driver = load_gen.ClassifyTarget(url, model, image.read_bytes(), content_type=content_type,
                                                 timeout=timeout, api_key=api_key, token=token,
                                                 max_connections=max_inflight)
        about: dict[str, Any] = {"target": target, "model": model, "version": version,
                                 "url": url if target != "kafka" else None,
                                 "image": str(image) if image is not None else None}
        done = asyncio.run(load_gen.run(driver, **plan, max_inflight=max_inflight, timeout=timeout,
                                        progress=lambda tally: console.print(tally.line(), highlight=False),
                                        **about))
    except (ValueError, RuntimeError, OSError, EventError, KafkaError) as exc:
        fail(getattr(exc, "message", None) or str(exc) or repr(exc))
    console.print(load_gen.summary_table(done.summary))
    verdicts = load_gen.evaluate(done.summary, thresholds)
    if verdicts:
        console.print(load_gen.verdict_table(verdicts))
        done.summary["thresholds"] = [asdict(v) for v in verdicts]
    if json_path is not None:
        json_path.write_text(json.dumps(done.summary, indent=2) + "\n")
        console.print(f"figures written to {json_path}")
    broken = [v for v in verdicts if not v.passed]
    if broken:
        error("thresholds broken: " + "; ".join(v.line() for v in broken))
        raise typer.Exit(THRESHOLD_BROKEN)


# -- replay ----------------------------------------------------------------------------------------


def _replay_filters(model, tenant, request_ids, request_ids_file, errors_only):
    from streams.ops.replay import Filters

    ids = set(request_ids or ())
    if request_ids_file is not None:
        ids |= {line.strip() for line in request_ids_file.read_text().splitlines() if line.strip()}
    return Filters(model, tenant, frozenset(ids) if ids else None, errors_only)


REPLAY_LINE_EVERY_S = 1.0


def _replay_progress(job):
    """Run the replay showing its progress (read, published, rate): a rich progress bar on a
    terminal, otherwise a plain line at most once a second."""
    from streams.ops.replay import Replayer

    async def main(show):
        # Built inside the running loop: aiokafka binds its clients to the loop they are created in.
        replayer = Replayer(get_settings(), job)
        return await replayer.run(show)

    if not console.is_terminal:
        last = [0.0]

        def line(p):
            if time.monotonic() - last[0] >= REPLAY_LINE_EVERY_S:
                last[0] = time.monotonic()
                verb = "would publish" if job.dry_run else "published"
                console.print(f"replay {job.name}: read {p.read}/{p.total}, {verb} {p.published}, "
                              f"{p.rate:.0f}/s", highlight=False, soft_wrap=True)

        return asyncio.run(main(line))

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("replay {task.fields[name]}"), BarColumn(), TextColumn("read {task.completed}/{task.total}"),
               TextColumn("published {task.fields[published]}"), TextColumn("{task.fields[rate]:.0f}/s"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("replay", total=None, name=job.name, published=0, rate=0.0)

        def show(p):
            bar.update(task, total=p.total, completed=p.read, published=p.published, rate=p.rate)

        return asyncio.run(main(show))


@app.command()
def replay(
    name: Annotated[Optional[str], typer.Option(help="names the checkpoint and the replayed ids")] = None,
    topic: Annotated[Optional[str], typer.Option(help="topic to read (default: the requests topic)")] = None,
    since: Annotated[Optional[str], typer.Option(help="ISO time or unix ms")] = None,
    until: Annotated[Optional[str], typer.Option(help="ISO time or unix ms (excluded)")] = None,
    from_offset: Annotated[Optional[list[str]], typer.Option(help="P:O, first offset (repeatable)")] = None,
    to_offset: Annotated[Optional[list[str]], typer.Option(help="P:O, last offset, included (repeatable)")] = None,
    model: Annotated[Optional[str], typer.Option(help="only this model's requests")] = None,
    tenant: Annotated[Optional[str], typer.Option(help="only this tenant's requests")] = None,
    request_id: Annotated[Optional[list[str]], typer.Option(help="original request id (repeatable)")] = None,
    request_ids_file: Annotated[Optional[Path], typer.Option(help="original request ids, one a line")] = None,
    errors_only: Annotated[bool, typer.Option(help="only requests whose stored result is an error")] = False,
    version: Annotated[Optional[str], typer.Option(help="send the copies to this model version")] = None,
    to_topic: Annotated[Optional[str], typer.Option(help="publish to this topic instead of the pipeline")] = None,
    compare: Annotated[
        Optional[str], typer.Option(help="VERSION: replay on it and report against the originals")
    ] = None,
    wait: Annotated[float, typer.Option(help="--compare: seconds to wait for the results")] = 120.0,
    rate: Annotated[Optional[float], typer.Option(help="events per second")] = None,
    max_events: Annotated[Optional[int], typer.Option(help="stop after this many")] = None,
    dry_run: Annotated[bool, typer.Option(help="only count what would be published")] = False,
    resume: Annotated[bool, typer.Option(help="continue the named replay from its checkpoint")] = False,
) -> None:
    """Re-publish stored request events (copies with new ids that answer no caller)."""
    from streams.ops.replay import ReplayJob, parse_offsets, parse_time
    from streams.ops.replay import compare as compare_versions

    if resume and name is None:
        fail("--resume needs the --name of the replay")
    if compare and (version or to_topic):
        fail("--compare sets the version and publishes to the pipeline itself")
    with refusing(ValueError):
        job = ReplayJob(
            name=name or time.strftime("%Y%m%dT%H%M%S"), topic=topic, target=to_topic, version=compare or version,
            since_ms=parse_time(since) if since else None, until_ms=parse_time(until) if until else None,
            from_offsets=parse_offsets(from_offset or ()), to_offsets=parse_offsets(to_offset or ()),
            filters=_replay_filters(model, tenant, request_id, request_ids_file, errors_only),
            rate=rate, max_events=max_events, dry_run=dry_run, resume=resume,
        )
    progress = _replay_progress(job)
    verb = "would publish" if dry_run else "published"
    console.print(f"replay {job.name}: read {progress.read}, {verb} {progress.published}"
                  f" (undecodable {progress.undecodable})")
    if compare and not dry_run:
        report, uri = asyncio.run(compare_versions(get_settings(), progress.origins, compare, job.name, wait))
        agreement = report["top1_agreement"]
        console.print(f"compared {report['compared']} on version {compare}: top-1 agreement "
                      f"{'-' if agreement is None else f'{agreement:.2%}'}, max abs diff {report['max_abs_diff']},"
                      f" latency diff ms {report['latency_diff_ms']}, differing {len(report['differing'])},"
                      f" missing {len(report['missing_replays'])}")
        console.print(f"report: {uri}")
