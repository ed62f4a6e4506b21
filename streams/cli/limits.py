"""`inferstream limits`: per-tenant rate limits (the others get the default)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from streams.cli.common import CommandGroup, console, get_settings, refusing
from streams.cli.stores import with_stores

app = CommandGroup(name="limits", help="Per-tenant rate limits: set, list, clear.")


def _check_tenant(tenant: str) -> None:
    """Refused before connecting: a tenant the worker would never see is the caller's mistake,
    whatever the stores' state."""
    from streams.gate.auth import check_tenant_and_scopes

    with refusing(ValueError):
        check_tenant_and_scopes(tenant, [])


@app.command("set")
def limits_set(tenant: Annotated[str, typer.Argument(help="the tenant")],
               requests_per_minute: Annotated[int, typer.Argument(help="its limit")]) -> None:
    """Override the default rate limit for one tenant."""
    _check_tenant(tenant)
    with_stores(lambda stores: stores.limits().set(tenant, requests_per_minute))
    console.print(f"{tenant}: {requests_per_minute} requests per minute")


@app.command("clear")
def limits_clear(tenant: Annotated[str, typer.Argument(help="the tenant")]) -> None:
    """Give a tenant the default rate limit again."""
    _check_tenant(tenant)
    with_stores(lambda stores: stores.limits().clear(tenant))
    console.print(f"{tenant}: default limit ({get_settings().rate_limit_per_minute} per minute)")


@app.command("list")
def limits_list() -> None:
    """The tenants with their own rate limit."""
    table = Table("tenant", "requests per minute")
    for tenant, limit in sorted(with_stores(lambda stores: stores.limits().list()).items()):
        table.add_row(tenant, str(limit))
    console.print(table)
