"""`inferstream` command line.

Commands import what they use when they run: `inferstream --help` and the simple reads load no
numpy, faust, aiokafka or onnxruntime. A user's mistake prints one `error:` line and exits 2; an
unexpected error prints one line too and exits 1 (`--debug` shows its traceback instead).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer import _click as click  # typer's own copy of click: its commands, contexts and exceptions
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

if TYPE_CHECKING:
    import numpy as np

    from streams.settings import Settings

USER_ERROR = 2  # the exit status of a refused command: bad input, a taken port, a missing id
INTERNAL_ERROR = 1  # an unexpected error (a bug, or a service that failed mid-command)


# -- help without type tags, errors in one line -----------------------------------------------


class _Argument(TyperArgument):
    """An argument shown by its name (NAME), without `{name}` braces or a `<str>` type tag."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return None

    def _rich_display_name(self) -> str:
        name = self.metavar or (self.name or "").upper()
        return f"{name}..." if self.nargs != 1 else name

    def _usage_display_name(self) -> str:
        name = self._rich_display_name()
        return name if self.required else f"[{name}]"


class _Option(TyperOption):
    """An option shown without a type tag (`<bool>`, `<int>`...): its help says what it takes."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return self.metavar


def _plain(param: click.Parameter) -> click.Parameter:
    if type(param) is TyperArgument:
        param.__class__ = _Argument
    elif type(param) is TyperOption:
        param.__class__ = _Option
    return param


def _debug_requested(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


class _Command(TyperCommand):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return [_plain(p) for p in super().get_params(ctx)]

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception as exc:
            if _debug_requested(ctx):
                raise
            _error(f"{_describe(exc)} ({type(exc).__name__}; --debug shows the traceback)")
            raise typer.Exit(INTERNAL_ERROR) from None


class _Group(TyperGroup):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return [_plain(p) for p in super().get_params(ctx)]


class _Typer(typer.Typer):
    """A typer app whose commands show help without type tags and report errors in one line."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=_Group, no_args_is_help=True, add_completion=False,
                         pretty_exceptions_enable=False, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        register = super().command(*args, **kwargs)

        def decorator(function: Any) -> Any:
            # Rich help keeps a docstring's line breaks: one line per paragraph reflows to the terminal.
            if function.__doc__:
                paragraphs = inspect.cleandoc(function.__doc__).split("\n\n")
                function.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
            return register(function)

        return decorator


def _describe(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


app = _Typer(help="inferstream: Kafka-native inference.")
stack_app = _Typer(help="The local stack: start, stop and show the broker, S3 server, PostgreSQL and Redis.")
models_app = _Typer(help="Models: build them, list, register and change registered versions.")
topics_app = _Typer(help="Create the Kafka topics of the contract.")
keys_app = _Typer(help="API keys: issue, list, revoke.")
limits_app = _Typer(help="Per-tenant rate limits: set, list, clear.")
dlq_app = _Typer(help="Dead letters: list, show, redrive.")
app.add_typer(stack_app, name="stack")
app.add_typer(models_app, name="models")
app.add_typer(topics_app, name="topics")
app.add_typer(keys_app, name="keys")
app.add_typer(limits_app, name="limits")
app.add_typer(dlq_app, name="dlq")
console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", envvar="INFERSTREAM_DEBUG",
                                        help="show the full traceback of an unexpected error")] = False,
) -> None:
    """inferstream: Kafka-native inference."""


def get_settings() -> Settings:
    from streams.settings import get_settings as settings

    return settings()


def _error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "red"), " ", message))


def _fail(message: str) -> NoReturn:
    """Refuse the command: one line, exit status 2."""
    _error(message)
    raise typer.Exit(USER_ERROR)


# -- stack -------------------------------------------------------------------------------------


def _local_stack(settings: Settings, storage: str | None = None):
    from infra.local.stack import LocalStack, StackError

    try:
        return LocalStack(settings, broker_storage=storage)
    except StackError as exc:
        _fail(str(exc))


@stack_app.command("up")
def stack_up(storage: Annotated[Optional[str], typer.Option(help="broker storage: s3 or memory")] = None) -> None:
    """Start the local stack (reusing what already runs) and create the topics."""
    from infra.local.stack import StackError

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
    """Each service: running, PID, endpoint."""
    table = Table("service", "running", "pid", "endpoint")
    for name, info in _local_stack(get_settings()).status().items():
        table.add_row(name, str(info.get("running")), str(info.get("pid") or "-"), str(info.get("endpoint")))
    console.print(table)


# -- topics and models -------------------------------------------------------------------------


def _create_topics(settings: Settings, quiet: bool = False) -> None:
    from streams.kafka.admin import ensure_topics
    from streams.registry.records import ModelRegistry

    models = ModelRegistry.load(settings.model_repository).names
    created = asyncio.run(ensure_topics(settings, models))
    if not quiet:
        console.print(f"topics: created {created}" if created else "topics: all present")


@topics_app.command("create")
def topics_create() -> None:
    """Create the requests, replies, results, dead-letter and per-model topics."""
    _create_topics(get_settings())


@models_app.command("build")
def models_build(
    only: Annotated[Optional[list[str]], typer.Option(help="model name (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="build again even when built")] = False,
) -> None:
    """Build the models into the model repository (cached: existing ones are kept)."""
    from models.build import build_models

    for path in build_models(get_settings().model_repository, only or None, force):
        console.print(f"model ready: {path}")


async def _with_stores(work):
    """Run `work(settings, pool, redis)` with the registry/keys/limits stores' connections."""
    import redis.asyncio as aioredis

    from streams.storage.results import ResultsStore
    from streams.storage.schema import migrate

    settings = get_settings()
    await migrate(settings.postgres_dsn)
    results = ResultsStore(settings.postgres_dsn)
    await results.start()
    redis = aioredis.from_url(settings.redis_url)
    try:
        return await work(settings, results.pool, redis)
    finally:
        await redis.aclose()
        await results.stop()


def _registry_call(method: str, *args, **kwargs):
    from streams.registry.store import RegistryError, RegistryStore

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
    name: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="version name")],
    artifact: Annotated[str, typer.Option(help="model.onnx: a local path or s3://bucket/key")],
    status: Annotated[str, typer.Option(help="active, draft or retired")] = "draft",
    weight: Annotated[int, typer.Option(help="share of unversioned requests")] = 0,
    shadow: Annotated[bool, typer.Option(help="mirror requests here; results stored, never returned")] = False,
    triton: Annotated[Optional[list[str]], typer.Option(help="a Triton backend host:port (grpc), repeatable")] = None,
    onnxruntime: Annotated[bool, typer.Option(help="also serve in the workers' onnxruntime")] = True,
    max_batch_size: Annotated[int, typer.Option(help="the largest batch the model takes")] = 64,
) -> None:
    """Register a model version; the artifact must load and match its signature."""
    from pydantic import ValidationError

    from streams.registry.records import BackendSpec
    from streams.registry.store import RegistryError, info_from_artifact
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
    name: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="version name")],
    status: Annotated[Optional[str], typer.Option(help="active, draft or retired")] = None,
    weight: Annotated[Optional[int], typer.Option(help="share of unversioned requests")] = None,
    shadow: Annotated[Optional[bool], typer.Option("--shadow/--no-shadow", help="mirror requests here")] = None,
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
    from streams.storage.objects import ObjectStore

    return ObjectStore(settings)


# -- API keys and limits ------------------------------------------------------------------------


def _keys_call(method: str, *args):
    from streams.gate.auth import ApiKeyStore

    async def work(settings, pool, redis):
        keys = ApiKeyStore(pool, redis, settings.api_key_pepper, settings.api_key_cache_ttl_s,
                           key_prefix=settings.topic_prefix)
        return await getattr(keys, method)(*args)

    return asyncio.run(_with_stores(work))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key authenticates")],
    scope: Annotated[list[str], typer.Option(help="'infer' (any model) or 'infer:<model>'; repeatable")] = ["infer"],  # noqa: B006
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
) -> None:
    """Issue an API key. It is shown once; only its hash is stored."""
    _check_tenant(tenant, scope)
    console.print(_keys_call("create", tenant, scope, name))


def _check_tenant(tenant: str, scopes: list[str] = []) -> None:  # noqa: B006 - never mutated
    """Refuse a tenant (or scopes) the worker would never see in credentials, before connecting:
    a bad tenant is the caller's mistake, whatever the stores' state."""
    from streams.gate.auth import check_tenant_and_scopes

    try:
        check_tenant_and_scopes(tenant, scopes)
    except ValueError as exc:
        _fail(str(exc))


@keys_app.command("list")
def keys_list(tenant: Annotated[Optional[str], typer.Option(help="only this tenant's keys")] = None) -> None:
    """API keys (never their secrets): id, tenant, scopes, name, created, revoked."""
    table = Table("key id", "tenant", "scopes", "name", "created", "revoked")
    for key in _keys_call("list", tenant):
        table.add_row(key["key_id"], key["tenant"], " ".join(key["scopes"]), key["name"],
                      str(key["created_at"]), str(key["revoked_at"] or ""))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")]) -> None:
    """Revoke a key (by its id, the part after `isk_`); it stops working at once."""
    if not _keys_call("revoke", key_id):
        _fail(f"no key {key_id}")
    console.print(f"revoked {key_id}")


def _limits_call(method: str, *args):
    from streams.gate.ratelimit import TenantLimits

    async def work(settings, pool, redis):
        limits = TenantLimits(pool, redis, settings.api_key_cache_ttl_s, key_prefix=settings.topic_prefix)
        return await getattr(limits, method)(*args)

    return asyncio.run(_with_stores(work))


@limits_app.command("set")
def limits_set(tenant: Annotated[str, typer.Argument(help="the tenant")],
               requests_per_minute: Annotated[int, typer.Argument(help="its limit")]) -> None:
    """Override the default rate limit for one tenant."""
    _check_tenant(tenant)
    _limits_call("set", tenant, requests_per_minute)
    console.print(f"{tenant}: {requests_per_minute} requests per minute")


@limits_app.command("clear")
def limits_clear(tenant: Annotated[str, typer.Argument(help="the tenant")]) -> None:
    """Give a tenant the default rate limit again."""
    _check_tenant(tenant)
    _limits_call("clear", tenant)
    console.print(f"{tenant}: default limit ({get_settings().rate_limit_per_minute} per minute)")


@limits_app.command("list")
def limits_list() -> None:
    """The tenants with their own rate limit."""
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
    settings = get_settings()
    _check_ports(_service_ports(settings, ("worker",), workers))
    if workers > 1:
        from streams.ops.scaling import run_workers

        raise typer.Exit(run_workers(workers, settings.metrics_port, settings.worker_restarts_per_minute))
    from agents import register_agents
    from streams.worker.app import run_worker

    run_worker(settings, register_agents)


@app.command()
def lag(group: Annotated[Optional[str], typer.Option(help="consumer group (default: the app id)")] = None) -> None:
    """Consumer lag per topic and partition, its total, and a suggested worker count."""
    from streams.telemetry.lag import read_lag, suggested_workers

    settings = get_settings()
    lags = asyncio.run(read_lag(settings, group))
    table = Table("group", "topic", "partition", "committed", "end", "lag")
    for p in lags:
        table.add_row(p.group, p.topic, str(p.partition), str(p.committed), str(p.end), str(p.lag))
    console.print(table)
    console.print(f"total lag: {sum(p.lag for p in lags)}")
    console.print(f"suggested workers: {suggested_workers(lags, settings.scale_lag_per_worker)}")


def _service_ports(settings: Settings, services: tuple[str, ...], workers: int = 1):
    """The ports the bridge and the worker processes bind (worker i serves its metrics on the
    metrics port + i)."""
    from infra.local.stack import Port

    ports = []
    if "bridge" in services:
        ports.append(Port(settings.bridge_port, "HTTP bridge", "INFERSTREAM_BRIDGE_PORT", settings.bridge_host))
    if "worker" in services and settings.metrics_port > 0:
        ports += [Port(settings.metrics_port + i, "worker metrics", "INFERSTREAM_METRICS_PORT") for i in range(workers)]
    return ports


def _check_ports(ports: list) -> None:
    from infra.local.stack import StackError, check_ports

    try:
        check_ports(ports)
    except StackError as exc:
        _fail(str(exc))


@app.command()
def bridge() -> None:
    """Run the HTTP bridge in the foreground."""
    from streams.bridge.app import run_bridge

    settings = get_settings()
    _check_ports(_service_ports(settings, ("bridge",)))
    run_bridge(settings)


class _Child:
    """A process `up` started, its output appended to a log file that `up` follows."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            self._offset = log_file.tell()  # follow only what this run writes
            self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", name], stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def new_lines(self) -> list[str]:
        with self.log_path.open("rb") as log_file:
            log_file.seek(self._offset)
            data = log_file.read()
        end = data.rfind(b"\n") + 1  # a partly written line waits for the next call
        self._offset += end
        return data[:end].decode(errors="replace").splitlines()

    def last_message(self) -> str:
        from streams.telemetry.logs import compact

        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return (compact(lines[-1]) or lines[-1]) if lines else "no output"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _answers_http(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


UP_READY_TIMEOUT_S = 120.0


@app.command()
def up(
    build: Annotated[bool, typer.Option(help="build missing models first")] = True,
    storage: Annotated[Optional[str], typer.Option(help="broker storage: s3 or memory")] = None,
    json_logs: Annotated[bool, typer.Option(help="also print the worker's and bridge's JSON log lines here")]
    = False,
) -> None:
    """The main job: build models if missing, start the local stack and topics, run a worker and the bridge.

    Ctrl-C stops what it started; the next run reuses the stored data. Logs go to files under the
    state directory; on a terminal each event is also shown as one short line."""
    from infra.local.stack import StackError
    from streams.telemetry.logs import compact

    settings = get_settings()
    stack = _local_stack(settings, storage)
    # Every port this job binds, checked before anything starts (the stack's own that already
    # run are reused, not bound).
    _check_ports(stack.ports_to_bind() + _service_ports(settings, ("worker", "bridge")))
    if build:
        _build_quietly(settings.model_repository)
    started: dict[str, _Child] = {}
    # Ctrl-C, and a service manager's stop, end the job (also where SIGINT came in ignored).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    failed: str | None = None
    code = INTERNAL_ERROR
    try:
        try:
            endpoints = stack.up()
            _create_topics(settings, quiet=True)
        except StackError as exc:
            failed, code = str(exc), USER_ERROR
            raise
        logs = settings.state_dir / "logs"
        started = {name: _Child(name, logs / f"{name}.log") for name in ("worker", "bridge")}
        bridge_url = f"http://{settings.bridge_host}:{settings.bridge_port}"
        failed = _wait_started(started, f"{bridge_url}/v2/health/live")
        if failed:
            raise StackError(failed)
        status = stack.status()
        pids = {name: started[name].proc.pid for name in started} | {
            name: status[name]["pid"] for name in ("kafka", "s3") if status[name]["pid"]}
        lines = [
            ("bridge", f"{bridge_url}  (pid {pids['bridge']})"),
            ("docs", f"{bridge_url}/openapi.json"),
            ("metrics", f"{bridge_url}/metrics"
                        + (f", worker http://127.0.0.1:{settings.metrics_port}/metrics"
                           if settings.metrics_port > 0 else "")),
            ("worker", f"pid {pids['worker']}"),
            ("kafka", f"{endpoints['kafka']}" + (f"  (pid {pids['kafka']})" if "kafka" in pids else "")),
            ("s3", f"{endpoints['s3']}" + (f"  (pid {pids['s3']})" if "s3" in pids else "")),
            ("postgres", endpoints["postgres"]),
            ("redis", endpoints["redis"]),
            ("logs", f"{logs}/{{worker,bridge,kafka,s3}}.log"),
        ]
        for name, where in lines:
            console.print(f"{name:>9}: {where}", soft_wrap=True, highlight=False)
        console.print("inferstream is up; Ctrl-C stops everything", highlight=False)
        follow = sys.stdout.isatty() or json_logs
        while not failed:
            for name, child in started.items():
                if follow:
                    for line in child.new_lines():
                        shown = line if json_logs else compact(line, name, chatter=False)
                        if shown:
                            console.print(Text(shown), soft_wrap=True)
                if child.proc.poll() is not None:
                    failed = f"{name} (pid {child.proc.pid}) exited with {child.proc.returncode}: " \
                             f"{child.last_message()}; log: {child.log_path}"
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except StackError:
        pass
    finally:
        for child in started.values():
            child.stop()
        stack.down()
        if failed:
            _error(failed)
        else:
            console.print("stopped")
    if failed:
        raise typer.Exit(code)


def _build_quietly(repository: Path) -> None:
    from models.build import MODELS, build_models, is_built

    missing = [name for name in MODELS if not is_built(repository / name)]
    if missing:
        console.print(f"   models: building {', '.join(missing)} (a few seconds each)...", highlight=False)
    build_models(repository)
    console.print(f"   models: {', '.join(MODELS)} in {repository}", highlight=False)


def _wait_started(children: dict[str, _Child], ready_url: str) -> str | None:
    """Until the bridge answers; the error when a child exits first (or nothing answers)."""
    deadline = time.monotonic() + UP_READY_TIMEOUT_S
    while not _answers_http(ready_url):
        for name, child in children.items():
            if child.proc.poll() is not None:
                return (f"{name} (pid {child.proc.pid}) exited with {child.proc.returncode} while starting: "
                        f"{child.last_message()}; log: {child.log_path}")
        if time.monotonic() > deadline:
            return f"the bridge did not answer {ready_url} within {UP_READY_TIMEOUT_S:.0f} s; " \
                   f"log: {children['bridge'].log_path}"
        time.sleep(0.2)
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# -- client ------------------------------------------------------------------------------------


def _parse_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    import numpy as np

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
        _fail(exc.message)
    if image is not None:
        if not info.preprocessing:
            _fail(f"model {model} takes no images")
        try:
            # The file itself where the model takes image files (the worker decodes it).
            inputs = info.image_file_inputs(image.read_bytes())
        except OSError as exc:
            _fail(f"--image {image}: {exc.strerror or type(exc).__name__}")
        except ImageError as exc:
            _fail(f"--image {image}: {exc}")
    elif input:
        inputs = _parse_inputs(input)
    else:
        _fail("give --image or --input")

    credentials = Credentials(api_key=api_key, authorization=f"Bearer {token}" if token else None)

    async def call():
        async with InferenceClient(settings) as client:
            result = await client.infer(model, inputs, version=version, timeout=timeout,
                                        credentials=credentials if api_key or token else None)
            return result, await client.outputs(result) if result.header.status == "ok" else {}

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
def result(request_id: Annotated[str, typer.Argument(help="the request's id")]) -> None:
    """Show the stored result of a request (PostgreSQL)."""
    from streams.storage.results import ResultsStore
    from streams.storage.schema import migrate

    async def fetch():
        settings = get_settings()
        await migrate(settings.postgres_dsn)
        async with ResultsStore(settings.postgres_dsn) as store:
            return await store.get(request_id)

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
    """Drive the bridge or the Kafka ingress at a fixed rate (open loop); counts each second, then figures."""
    import json

    from aiokafka.errors import KafkaError

    from streams.ops import load as load_gen
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
        about: dict[str, Any] = {"target": target, "model": model, "version": version,
                                 "url": url if target == "bridge" else None}
        done = asyncio.run(load_gen.run(driver, rate=rate, duration=duration, warmup=warmup,
                                        max_inflight=max_inflight, timeout=timeout,
                                        progress=lambda tally: console.print(tally.line(), highlight=False),
                                        **about))
    except (ValueError, RuntimeError, OSError, EventError, KafkaError) as exc:
        _fail(getattr(exc, "message", None) or str(exc) or repr(exc))
    console.print(load_gen.summary_table(done.summary))
    if json_path is not None:
        json_path.write_text(json.dumps(done.summary, indent=2) + "\n")
        console.print(f"figures written to {json_path}")


# -- replay and dead letters -------------------------------------------------------------------


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


@dlq_app.command("list")
def dlq_list(reason: Annotated[Optional[list[str]], typer.Option(help="only this reason (repeatable)")] = None) -> None:
    """Dead letters: position, reason, source, request id, time (foreign records as UNREADABLE)."""
    from datetime import UTC, datetime

    from rich.text import Text

    from streams.ops.dlq import Letter, read_letters, select
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
    from streams.ops.dlq import describe, read_letters, select
    from streams.ops.replay import parse_positions
    from streams.storage.objects import ObjectStore

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

    from streams.ops.dlq import StoreUnreachable, read_letters, redrive, select
    from streams.ops.replay import parse_positions
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
        _fail(printable(str(exc)))
    for x in sent:
        note = " (redacted: sent without its credentials)" if x.letter.redacted else ""
        console.print(escape(printable(f"redriven {x.position} ({x.letter.reason.value}, {x.letter.request_id})"
                                       f" -> {x.letter.source_topic}{note}")))
    for skip in skipped:
        console.print(escape(printable(f"skipped {skip.record.position}: {skip.why}")))
    console.print(f"redriven {len(sent)}, skipped {len(skipped)}")


def main() -> None:
    """The `inferstream` entry point: a usage error (unknown option, bad value) is one line too."""
    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        code = 0
    except click.exceptions.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _error(" ".join(exc.format_message().split()) + hint)
        code = exc.exit_code
    except typer.Abort:
        code = INTERNAL_ERROR
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
