"""The long-running processes (`inferstream worker`, `inferstream bridge`) and the lag that says
how many workers to run."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from streams.cli.common import CommandGroup, console, fail, get_settings
from streams.cli.ports import refuse_taken, service_ports

if TYPE_CHECKING:
    from streams.settings import Settings

app = CommandGroup()


def refuse_to_serve(settings: Settings, services: tuple[str, ...], workers: int = 1) -> None:
    """Refuse, once and before any process starts, what every process would refuse on its own:
    a taken port, or a placeholder secret with auth required (a supervisor would otherwise
    restart its workers until its restart limit)."""
    from streams.settings import refuse_placeholder_secrets

    refuse_taken(service_ports(settings, services, workers))
    try:
        refuse_placeholder_secrets(settings)
    except ValueError as e:
        fail(str(e))


@app.command()
def worker(
    workers: Annotated[int, typer.Option(min=1, help="worker processes (one consumer group)")] = 1,
) -> None:
    """Run a worker (intake, inference and sink agents) in the foreground."""
    settings = get_settings()
    refuse_to_serve(settings, ("worker",), workers)
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


@app.command()
def bridge() -> None:
    """Run the HTTP bridge in the foreground."""
    from streams.bridge.app import run_bridge

    settings = get_settings()
    refuse_to_serve(settings, ("bridge",))
    run_bridge(settings)
