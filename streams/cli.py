"""`inferstream` command line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from streams.settings import Settings, get_settings

app = typer.Typer(help="inferstream: Kafka-native inference.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: broker, S3 server, PostgreSQL, Redis.", no_args_is_help=True)
models_app = typer.Typer(help="Build and list models.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics of the contract.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(models_app, name="models")
app.add_typer(topics_app, name="topics")
keys_app = typer.Typer(help="API keys: issue, list, revoke.", no_args_is_help=True)
limits_app = typer.Typer(help="Per-tenant rate limits.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(limits_app, name="limits")
console = Console()


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


# -- stack -------------------------------------------------------------------------------------


def _local_stack(settings: Settings, storage: str | None = None):
    from streams.stack import LocalStack

    return LocalStack(settings, broker_storage=storage)


@stack_app.command("up")
def stack_up(storage: Annotated[Optional[str], typer.Option(help="broker storage: s3 or memory")] = None) -> None:
    """Start the local stack (reusing what already runs) and create the topics."""
    from streams.stack import StackError

    settings = get_settings()
    try:
        endpoints = _local_stack(settings, storage).up()
    except StackError as exc:
        _fail(str(exc))
    for name, where in endpoints.items():
        console.print(f"{name:>9}: {where}")
    _create_topics(settings)


@stack_app.command("down")
def stack_down() -> None:
    """Stop what `stack up` started (data stays in the state directory)."""
    _local_stack(get_settings()).down()


@stack_app.command("status")
def stack_status() -> None:
    table = Table("service", "running", "pid", "endpoint")
    for name, info in _local_stack(get_settings()).status().items():
        table.add_row(name, str(info.get("running")), str(info.get("pid") or "-"), str(info.get("endpoint")))
    console.print(table)


# -- topics and models -------------------------------------------------------------------------


def _create_topics(settings: Settings) -> None:
    from streams.registry import ModelRegistry
    from topics.admin import ensure_topics

    models = ModelRegistry.load(settings.model_repository).names
    created = asyncio.run(ensure_topics(settings, models))
    console.print(f"topics: created {created}" if created else "topics: all present")


@topics_app.command("create")
def topics_create() -> None:
    """Create the requests, replies, results, dead-letter and per-model topics."""
    _create_topics(get_settings())


@models_app.command("build")
def models_build(
    only: Annotated[Optional[list[str]], typer.Option(help="model name (repeatable)")] = None,
    force: bool = False,
) -> None:
    """Build the models into the model repository (cached: existing ones are kept)."""
    from models.build import build_models

    for path in build_models(get_settings().model_repository, only or None, force):
        console.print(f"model ready: {path}")


async def _with_stores(work):
    """Run `work(settings, pool, redis)` with the registry/keys/limits stores' connections."""
    import redis.asyncio as aioredis

    from streams.results_store import ResultsStore

    settings = get_settings()
    results = ResultsStore(settings.postgres_dsn)
    await results.start()  # creates or migrates the schema
    redis = aioredis.from_url(settings.redis_url)
    try:
        return await work(settings, results.pool, redis)
    finally:
        await redis.aclose()
        await results.stop()


def _registry_call(method: str, *args, **kwargs):
    from streams.registry_store import RegistryError, RegistryStore

    async def work(settings, pool, redis):
        return await getattr(RegistryStore(settings, pool, redis), method)(*args, **kwargs)

    try:
        return asyncio.run(_with_stores(work))
    except RegistryError as exc:
        _fail(str(exc))


@models_app.command("list")
def models_list() -> None:
    """Registered versions: status, routing weight, shadow, backends."""
    table = Table("model", "version", "status", "weight", "shadow", "backends", "inputs", "artifact")
    for info in _registry_call("list"):
        sig = ", ".join(f"{s.name} {s.dtype}{s.shape}" for s in info.inputs)
        table.add_row(info.name, info.version, info.status, str(info.weight), str(info.shadow),
                      ", ".join(b.label for b in info.backends), sig, info.artifact or "")
    console.print(table)


@models_app.command("register")
def models_register(
    name: str,
    version: str,
    artifact: Annotated[str, typer.Option(help="model.onnx: a local path or s3://bucket/key")],
    status: Annotated[str, typer.Option(help="active, draft or retired")] = "draft",
    weight: Annotated[int, typer.Option(help="share of unversioned requests")] = 0,
    shadow: Annotated[bool, typer.Option(help="mirror requests here; results stored, never returned")] = False,
    triton: Annotated[Optional[list[str]], typer.Option(help="a Triton backend host:port (grpc), repeatable")] = None,
    onnxruntime: Annotated[bool, typer.Option(help="also serve in the workers' onnxruntime")] = True,
    max_batch_size: int = 64,
) -> None:
    """Register a model version; the artifact must load and match its signature."""
    from pydantic import ValidationError

    from streams.registry import BackendSpec
    from streams.registry_store import RegistryError, info_from_artifact
    from topics.events import problems

    settings = get_settings()
    backends = ([BackendSpec()] if onnxruntime else []) + [BackendSpec(kind="triton", url=u) for u in triton or []]
    if not backends:
        _fail("a version needs a backend: onnxruntime and/or --triton")
    try:
        info = info_from_artifact(name, version, artifact, _object_store(settings), settings.state_dir / "artifacts",
                                  status=status, weight=weight, shadow=shadow, backends=backends,
                                  max_batch_size=max_batch_size)
    except ValidationError as exc:
        _fail(f"{name}/{version}: {problems(exc)}")
    except RegistryError as exc:
        _fail(str(exc))
    saved = _registry_call("save", info)
    console.print(f"registered {saved.key} (revision {saved.revision}, {saved.status}, weight {saved.weight})")


@models_app.command("set")
def models_set(
    name: str,
    version: str,
    status: Annotated[Optional[str], typer.Option(help="active, draft or retired")] = None,
    weight: Annotated[Optional[int], typer.Option()] = None,
    shadow: Annotated[Optional[bool], typer.Option("--shadow/--no-shadow")] = None,
) -> None:
    """Change a version's status, routing weight or shadow flag (live: workers follow)."""
    current = _registry_call("get", name, version)
    if current is None:
        _fail(f"no registered version {name}/{version}")
    changes = {k: v for k, v in {"status": status, "weight": weight, "shadow": shadow}.items() if v is not None}
    saved = _registry_call("save", current.model_copy(update=changes), validate=False)
    console.print(f"{saved.key}: revision {saved.revision}, {saved.status}, "
                  f"weight {saved.weight}, shadow {saved.shadow}")


def _object_store(settings: Settings):
    from streams.objectstore import ObjectStore

    return ObjectStore(settings)


# -- API keys and limits ------------------------------------------------------------------------


def _keys_call(method: str, *args):
    from streams.auth import ApiKeyStore

    async def work(settings, pool, redis):
        keys = ApiKeyStore(pool, redis, settings.api_key_pepper, settings.api_key_cache_ttl_s,
                           key_prefix=settings.topic_prefix)
        return await getattr(keys, method)(*args)

    return asyncio.run(_with_stores(work))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option()],
    scope: Annotated[list[str], typer.Option(help="'infer' (any model) or 'infer:<model>'; repeatable")] = ["infer"],  # noqa: B006
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
) -> None:
    """Issue an API key. It is shown once; only its hash is stored."""
    _check_tenant(tenant, scope)
    console.print(_keys_call("create", tenant, scope, name))


def _check_tenant(tenant: str, scopes: list[str] = []) -> None:  # noqa: B006 - never mutated
    """Refuse a tenant (or scopes) the worker would never see in credentials, before connecting:
    a bad tenant is the caller's mistake, whatever the stores' state."""
    from rich.markup import escape

    from streams.auth import check_tenant_and_scopes

    try:
        check_tenant_and_scopes(tenant, scopes)
    except ValueError as exc:
        _fail(escape(str(exc)))


@keys_app.command("list")
def keys_list(tenant: Annotated[Optional[str], typer.Option()] = None) -> None:
    table = Table("key id", "tenant", "scopes", "name", "created", "revoked")
    for key in _keys_call("list", tenant):
        table.add_row(key["key_id"], key["tenant"], " ".join(key["scopes"]), key["name"],
                      str(key["created_at"]), str(key["revoked_at"] or ""))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key (by its id, the part after `isk_`); it stops working at once."""
    if not _keys_call("revoke", key_id):
        _fail(f"no key {key_id}")
    console.print(f"revoked {key_id}")


def _limits_call(method: str, *args):
    from streams.ratelimit import TenantLimits

    async def work(settings, pool, redis):
        limits = TenantLimits(pool, redis, settings.api_key_cache_ttl_s, key_prefix=settings.topic_prefix)
        return await getattr(limits, method)(*args)

    return asyncio.run(_with_stores(work))


@limits_app.command("set")
def limits_set(tenant: str, requests_per_minute: int) -> None:
    """Override the default rate limit for one tenant."""
    _check_tenant(tenant)
    _limits_call("set", tenant, requests_per_minute)
    console.print(f"{tenant}: {requests_per_minute} requests per minute")


@limits_app.command("clear")
def limits_clear(tenant: str) -> None:
    _check_tenant(tenant)
    _limits_call("clear", tenant)
    console.print(f"{tenant}: default limit ({get_settings().rate_limit_per_minute} per minute)")


@limits_app.command("list")
def limits_list() -> None:
    table = Table("tenant", "requests per minute")
    for tenant, limit in sorted(_limits_call("list").items()):
        table.add_row(tenant, str(limit))
    console.print(table)


# -- worker and main job ----------------------------------------------------------------------


@app.command()
def worker(
    workers: Annotated[int, typer.Option(min=1, help="worker processes (one consumer group)")] = 1,
) -> None:
    """Run a worker (intake, inference and sink agents) in the foreground."""
    if workers > 1:
        from streams.scaling import run_workers

        settings = get_settings()
        raise typer.Exit(run_workers(workers, settings.metrics_port, settings.worker_restarts_per_minute))
    from streams.app import run_worker

    run_worker(get_settings())


@app.command()
def lag(group: Annotated[Optional[str], typer.Option(help="consumer group (default: the app id)")] = None) -> None:
    """Consumer lag per topic and partition, its total, and a suggested worker count."""
    from streams.scaling import read_lag, suggested_workers

    settings = get_settings()
    lags = asyncio.run(read_lag(settings, group))
    table = Table("group", "topic", "partition", "committed", "end", "lag")
    for p in lags:
        table.add_row(p.group, p.topic, str(p.partition), str(p.committed), str(p.end), str(p.lag))
    console.print(table)
    console.print(f"total lag: {sum(p.lag for p in lags)}")
    console.print(f"suggested workers: {suggested_workers(lags, settings.scale_lag_per_worker)}")


@app.command()
def bridge() -> None:
    """Run the HTTP bridge in the foreground."""
    from streams.bridge import run_bridge

    run_bridge(get_settings())


@app.command()
def up(
    build: Annotated[bool, typer.Option(help="build missing models first")] = True,
    storage: Annotated[Optional[str], typer.Option(help="broker storage: s3 or memory")] = None,
) -> None:
    """The main job: build models if missing, start the local stack, create topics, run a worker
    and the HTTP bridge.
    Ctrl-C stops what it started; the next run reuses the stored data."""
    from streams.stack import StackError

    settings = get_settings()
    if build:
        models_build(only=None, force=False)
    stack = _local_stack(settings, storage)
    try:
        for name, where in stack.up().items():
            console.print(f"{name:>9}: {where}")
        _create_topics(settings)
    except StackError as exc:
        stack.down()
        _fail(str(exc))
    children = {
        name: subprocess.Popen([sys.executable, "-m", "streams.cli", name], start_new_session=True)
        for name in ("worker", "bridge")
    }
    console.print(f"   worker: pid {children['worker'].pid}")
    console.print(f"   bridge: http://{settings.bridge_host}:{settings.bridge_port} (pid {children['bridge'].pid})")
    console.print("Ctrl-C stops everything")
    # Ctrl-C, and a service manager's stop, end the job (also where SIGINT came in ignored).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        while all(child.poll() is None for child in children.values()):
            time.sleep(0.5)
        for name, child in children.items():
            if child.poll() is not None:
                console.print(f"[red]{name} exited with {child.returncode}[/red]")
    except KeyboardInterrupt:
        pass
    finally:
        for child in children.values():
            _stop_child(child)
        stack.down()
        console.print("stopped")


def _stop_child(child: subprocess.Popen) -> None:
    if child.poll() is None:
        os.kill(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# -- client ------------------------------------------------------------------------------------


def _parse_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    inputs = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            _fail(f"--input takes NAME=FILE.npy, got {spec!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            _fail(f"--input {name}: cannot read {path} as a .npy array ({type(exc).__name__})")
    return inputs


@app.command()
def infer(
    model: Annotated[str, typer.Option(help="model name")],
    image: Annotated[Optional[Path], typer.Option(help="image file (image models)")] = None,
    input: Annotated[Optional[list[str]], typer.Option(help="NAME=FILE.npy (repeatable)")] = None,
    version: Annotated[Optional[str], typer.Option()] = None,
    top_k: Annotated[int, typer.Option(help="labels to show for image models")] = 5,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the reply")] = 30.0,
    api_key: Annotated[Optional[str], typer.Option(envvar="INFERSTREAM_API_KEY", help="an API key")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="INFERSTREAM_TOKEN", help="a JWT bearer token")] = None,
) -> None:
    """Produce one request event, wait for its reply and print the prediction."""
    from models.preprocess import (
        ImageError,
        image_to_tensor,
        load_image,
        load_labels,
        probabilities,
    )
    from models.preprocess import top_k as best
    from streams.client import InferenceClient
    from streams.registry import ModelRegistry
    from topics.errors import EventError
    from topics.events import Credentials

    settings = get_settings()
    try:
        info = ModelRegistry.load(settings.model_repository).resolve(model, version)
    except EventError as exc:
        _fail(exc.message)
    if image is not None:
        if not info.preprocessing:
            _fail(f"model {model} takes no images")
        try:
            inputs = {info.inputs[0].name: image_to_tensor(load_image(image), info.preprocessing)}
        except ImageError as exc:
            _fail(f"--image {exc}")
    elif input:
        inputs = _parse_inputs(input)
    else:
        _fail("give --image or --input")

    credentials = Credentials(api_key=api_key, authorization=f"Bearer {token}" if token else None)

    async def call():
        async with InferenceClient(settings) as client:
            result = await client.infer(model, inputs, version=version, timeout=timeout,
                                        credentials=credentials if api_key or token else None)
            return result, client.outputs(result) if result.header.status == "ok" else {}

    try:
        result, outputs = asyncio.run(call())
    except TimeoutError as exc:
        _fail(str(exc))
    header = result.header
    if header.error:
        _fail(f"{header.error.code}: {header.error.message}")
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
def result(request_id: str) -> None:
    """Show the stored result of a request (PostgreSQL)."""
    from streams.results_store import ResultsStore

    async def fetch():
        store = ResultsStore(get_settings().postgres_dsn)
        await store.start()
        try:
            return await store.get(request_id)
        finally:
            await store.stop()

    row = asyncio.run(fetch())
    if row is None:
        _fail(f"no result for {request_id}")
    for key, value in dict(row).items():
        console.print(f"{key:>16}: {f'<{len(value)} bytes>' if isinstance(value, bytes) else value}")


@app.command("load")
def load_command(
    target: Annotated[str, typer.Option(help="bridge (HTTP, Open Inference Protocol) or kafka (InferenceClient)")]
    = "bridge",
    url: Annotated[Optional[str], typer.Option(help="bridge base URL (default: the settings' bridge)")] = None,
    rate: Annotated[float, typer.Option(help="requests per second, started on schedule (open loop)")] = 50.0,
    duration: Annotated[float, typer.Option(help="seconds measured")] = 10.0,
    warmup: Annotated[float, typer.Option(help="seconds at the same rate before, not counted")] = 0.0,
    model: Annotated[str, typer.Option(help="model name")] = "tiny",
    version: Annotated[Optional[str], typer.Option(help="pin a model version")] = None,
    shape: Annotated[Optional[list[str]], typer.Option(help="[NAME=]D1,D2,... input shape (repeatable)")] = None,
    max_inflight: Annotated[int, typer.Option(min=1, help="requests in flight at most; a due request over it"
                                                          " is dropped")] = 1000,
    timeout: Annotated[float, typer.Option(help="seconds each request may take (its deadline)")] = 10.0,
    api_key: Annotated[Optional[str], typer.Option(envvar="INFERSTREAM_API_KEY", help="an API key")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="INFERSTREAM_TOKEN", help="a JWT bearer token")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random inputs")] = 0,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="also write the figures here")] = None,
) -> None:
    """Drive the bridge or the Kafka ingress at a fixed rate (open loop) and print the figures."""
    import json

    from aiokafka.errors import KafkaError

    from streams import load as load_gen
    from topics.errors import EventError

    if target not in ("bridge", "kafka"):
        _fail(f"--target is bridge or kafka, got {target!r}")
    try:
        shapes = load_gen.parse_shapes(shape or [])
        driver: load_gen.BridgeTarget | load_gen.KafkaTarget
        if target == "bridge":
            if url is None:
                settings = get_settings()
                url = f"http://{settings.bridge_host}:{settings.bridge_port}"
            driver = load_gen.BridgeTarget(url, model, version=version, timeout=timeout, shapes=shapes,
                                           api_key=api_key, token=token, max_connections=max_inflight, seed=seed)
        else:
            driver = load_gen.KafkaTarget(get_settings(), model, version=version, timeout=timeout, shapes=shapes,
                                          api_key=api_key, token=token, seed=seed)
        about = {"target": target, "model": model, "version": version, "url": url if target == "bridge" else None}
        done = asyncio.run(load_gen.run(driver, rate=rate, duration=duration, warmup=warmup,
                                        max_inflight=max_inflight, timeout=timeout, **about))
    except (ValueError, RuntimeError, OSError, EventError, KafkaError) as exc:
        _fail(getattr(exc, "message", None) or str(exc) or repr(exc))
    console.print(load_gen.summary_table(done.summary))
    if json_path is not None:
        json_path.write_text(json.dumps(done.summary, indent=2) + "\n")
        console.print(f"figures written to {json_path}")


# -- replay and dead letters -------------------------------------------------------------------


def _replay_filters(model, tenant, request_ids, request_ids_file, errors_only):
    from streams.replay import Filters

    ids = set(request_ids or ())
    if request_ids_file is not None:
        ids |= {line.strip() for line in request_ids_file.read_text().splitlines() if line.strip()}
    return Filters(model, tenant, frozenset(ids) if ids else None, errors_only)


def _replay_progress(job):
    """Run the replay under a rich progress bar: read, published, rate, ETA."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from streams.replay import Replayer

    columns = (TextColumn("replay {task.fields[name]}"), BarColumn(), TextColumn("read {task.completed}/{task.total}"),
               TextColumn("published {task.fields[published]}"), TextColumn("{task.fields[rate]:.0f}/s"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("replay", total=None, name=job.name, published=0, rate=0.0)

        def show(p):
            bar.update(task, total=p.total, completed=p.read, published=p.published, rate=p.rate)

        async def main():
            # Built inside the running loop: aiokafka binds its clients to the loop they are created in.
            replayer = Replayer(get_settings(), job)
            return await replayer.run(show)

        return asyncio.run(main())


@app.command()
def replay(
    name: Annotated[Optional[str], typer.Option(help="names the checkpoint and the replayed ids")] = None,
    topic: Annotated[Optional[str], typer.Option(help="topic to read (default: the requests topic)")] = None,
    since: Annotated[Optional[str], typer.Option(help="ISO time or unix ms")] = None,
    until: Annotated[Optional[str], typer.Option(help="ISO time or unix ms (excluded)")] = None,
    from_offset: Annotated[Optional[list[str]], typer.Option(help="P:O, first offset (repeatable)")] = None,
    to_offset: Annotated[Optional[list[str]], typer.Option(help="P:O, last offset, included (repeatable)")] = None,
    model: Optional[str] = None,
    tenant: Optional[str] = None,
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
    from streams.replay import ReplayJob, parse_offsets, parse_time
    from streams.replay import compare as compare_versions

    if resume and name is None:
        _fail("--resume needs the --name of the replay")
    if compare and (version or to_topic):
        _fail("--compare sets the version and publishes to the pipeline itself")
    try:
        job = ReplayJob(
            name=name or time.strftime("%Y%m%dT%H%M%S"), topic=topic, target=to_topic, version=compare or version,
            since_ms=parse_time(since) if since else None, until_ms=parse_time(until) if until else None,
            from_offsets=parse_offsets(from_offset or ()), to_offsets=parse_offsets(to_offset or ()),
            filters=_replay_filters(model, tenant, request_id, request_ids_file, errors_only),
            rate=rate, max_events=max_events, dry_run=dry_run, resume=resume,
        )
    except ValueError as exc:
        _fail(str(exc))
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


dlq_app = typer.Typer(help="Dead letters: list, show, redrive.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(reason: Annotated[Optional[list[str]], typer.Option(help="only this reason (repeatable)")] = None) -> None:
    """Dead letters: position (partition:offset), reason, source, request id, time; and records
    on the topic that are no dead letters, as UNREADABLE."""
    from datetime import UTC, datetime

    from rich.text import Text

    from streams.dlq import Letter, read_letters, select
    from topics.errors import printable

    records = select(asyncio.run(read_letters(get_settings())), reasons=set(reason) if reason else None)
    table = Table("position", "reason", "source", "request id", "failed at", "message")
    for x in records:
        if not isinstance(x, Letter):
            table.add_row(x.position, "UNREADABLE", "-", "-", "-", Text(f"{x.problem} | {x.preview[:80]}"))
            continue
        d = x.letter
        # The fields come from the topic: shown as plain text, never as markup or terminal codes.
        table.add_row(x.position, d.reason.value,
                      Text(printable(f"{d.source_topic}[{d.source_partition}]@{d.source_offset}")),
                      Text(printable(d.request_id or "-")),
                      datetime.fromtimestamp(d.failed_ms / 1000, UTC).isoformat(timespec="seconds"),
                      Text(printable(d.message[:80])))
    console.print(table)


@dlq_app.command("show")
def dlq_show(position: Annotated[str, typer.Argument(help="PARTITION:OFFSET in the dead-letter topic")]) -> None:
    """One dead letter with its original event decoded."""
    from streams.dlq import describe, read_letters, select
    from streams.objectstore import ObjectStore
    from streams.replay import parse_positions

    try:
        ((partition, offset),) = parse_positions([position])
    except ValueError as exc:
        _fail(str(exc))
    settings = get_settings()
    found = select(asyncio.run(read_letters(settings)), positions={(partition, offset)})
    if not found:
        _fail(f"no dead letter at {position}")
    console.print_json(data=asyncio.run(describe(ObjectStore(settings), found[0])))


@dlq_app.command("redrive")
def dlq_redrive(
    position: Annotated[Optional[list[str]], typer.Option("--offset", help="PARTITION:OFFSET (repeatable)")] = None,
    reason: Annotated[Optional[list[str]], typer.Option(help="every letter with this reason (repeatable)")] = None,
    all_letters: Annotated[bool, typer.Option("--all", help="every dead letter")] = False,
) -> None:
    """Send dead letters' original events back to their source topic (once per dead letter)."""
    from rich.markup import escape

    from streams.dlq import StoreUnreachable, read_letters, redrive, select
    from streams.replay import parse_positions
    from topics.errors import printable

    if not (position or reason or all_letters):
        _fail("name the letters: --offset P:O, --reason CODE or --all")
    try:
        positions = set(parse_positions(position)) if position else None
    except ValueError as exc:
        _fail(str(exc))
    settings = get_settings()
    letters = select(asyncio.run(read_letters(settings)), positions=positions,
                     reasons=set(reason) if reason else None)
    try:
        sent, skipped = asyncio.run(redrive(settings, letters))
    except StoreUnreachable as exc:
        _fail(escape(printable(str(exc))))
    for x in sent:
        note = " (redacted: sent without its credentials)" if x.letter.redacted else ""
        console.print(escape(printable(f"redriven {x.position} ({x.letter.reason.value}, {x.letter.request_id})"
                                       f" -> {x.letter.source_topic}{note}")))
    for skip in skipped:
        console.print(escape(printable(f"skipped {skip.record.position}: {skip.why}")))
    console.print(f"redriven {len(sent)}, skipped {len(skipped)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
