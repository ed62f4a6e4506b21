"""`inferstream models`: the model registry (registered versions, their routing and backends)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Optional, TypeVar

import typer
from rich.table import Table

from streams.cli.common import CommandGroup, console, fail, get_settings, refusing
from streams.cli.stores import with_stores

if TYPE_CHECKING:
    from streams.registry.store import RegistryStore

T = TypeVar("T")

app = CommandGroup(name="models", help="Models: list, register and change registered versions.")


def _on_registry(use: Callable[[RegistryStore], Awaitable[T]]) -> T:
    from streams.registry.store import RegistryError

    with refusing(RegistryError):
        return with_stores(lambda stores: use(stores.registry()))


@app.command("list")
def models_list() -> None:
    """Registered versions: status, routing weight, shadow, backends."""
    table = Table("model", "version", "status", "weight", "shadow", "backends", "inputs", "artifact")
    for info in _on_registry(lambda registry: registry.list()):
        sig = ", ".join(f"{s.name} {s.dtype}{s.shape}" for s in info.inputs)
        table.add_row(info.name, info.version, info.status, str(info.weight), str(info.shadow),
                      ", ".join(b.label for b in info.backends), sig, info.artifact or "")
    console.print(table)


def _backend_fields(option: str) -> dict[str, str]:
    """`--backend KIND[=HOST:PORT]` as BackendSpec fields (the kind is checked by BackendSpec)."""
    kind, _, url = option.partition("=")
    return {"kind": kind, "url": url} if url else {"kind": kind}


@app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="version name")],
    artifact: Annotated[str, typer.Option(help="model.onnx: a local path or s3://bucket/key")],
    status: Annotated[str, typer.Option(help="active, draft or retired")] = "draft",
    weight: Annotated[int, typer.Option(help="share of unversioned requests")] = 0,
    shadow: Annotated[bool, typer.Option(help="mirror requests here; results stored, never returned")] = False,
    backend: Annotated[Optional[list[str]], typer.Option(
        help="where it runs: KIND, or KIND=HOST:PORT for a server (e.g. onnxruntime, triton=10.0.0.5:8001),"
             " repeatable; default: onnxruntime in the workers")] = None,
    max_batch_size: Annotated[int, typer.Option(help="the largest batch the model takes")] = 64,
) -> None:
    """Register a model version; the artifact must load and match its signature."""
    from pydantic import ValidationError

    from streams.registry.records import BackendSpec
    from streams.registry.store import RegistryError, info_from_artifact
    from streams.storage.objects import ObjectStore
    from topics.events import problems

    settings = get_settings()
    try:
        backends = [BackendSpec.model_validate(_backend_fields(b)) for b in backend or ["onnxruntime"]]
        info = info_from_artifact(name, version, artifact, ObjectStore(settings), settings.state_dir / "artifacts",
                                  status=status, weight=weight, shadow=shadow, backends=backends,
                                  max_batch_size=max_batch_size)
    except ValidationError as exc:
        fail(f"{name}/{version}: {problems(exc)}")
    except RegistryError as exc:
        fail(str(exc))
    saved = _on_registry(lambda registry: registry.save(info))
    console.print(f"registered {saved.key} (revision {saved.revision}, {saved.status}, weight {saved.weight})")


@app.command("set")
def models_set(
    name: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="version name")],
    status: Annotated[Optional[str], typer.Option(help="active, draft or retired")] = None,
    weight: Annotated[Optional[int], typer.Option(help="share of unversioned requests")] = None,
    shadow: Annotated[Optional[bool], typer.Option("--shadow/--no-shadow", help="mirror requests here")] = None,
) -> None:
    """Change a version's status, routing weight or shadow flag (live: workers follow)."""
    current = _on_registry(lambda registry: registry.get(name, version))
    if current is None:
        fail(f"no registered version {name}/{version}")
    changes = {k: v for k, v in {"status": status, "weight": weight, "shadow": shadow}.items() if v is not None}
    changed = current.model_copy(update=changes)
    saved = _on_registry(lambda registry: registry.save(changed, validate=False))
    console.print(f"{saved.key}: revision {saved.revision}, {saved.status}, "
                  f"weight {saved.weight}, shadow {saved.shadow}")
