"""`inferstream keys`: API keys (issued once, stored as hashes)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from streams.cli.common import CommandGroup, console, fail, refusing
from streams.cli.stores import with_stores

app = CommandGroup(name="keys", help="API keys: issue, list, revoke.")


@app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key authenticates")],
    scope: Annotated[list[str], typer.Option(help="'infer' (any model) or 'infer:<model>'; repeatable")] = ["infer"],  # noqa: B006
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
) -> None:
    """Issue an API key. It is shown once; only its hash is stored."""
    from streams.gate.auth import check_tenant_and_scopes

    # Refused before connecting: a tenant the worker would never see is the caller's mistake,
    # whatever the stores' state.
    with refusing(ValueError):
        check_tenant_and_scopes(tenant, scope)
    console.print(with_stores(lambda stores: stores.keys().create(tenant, scope, name)))


@app.command("list")
def keys_list(tenant: Annotated[Optional[str], typer.Option(help="only this tenant's keys")] = None) -> None:
    """API keys (never their secrets): id, tenant, scopes, name, created, revoked."""
    table = Table("key id", "tenant", "scopes", "name", "created", "revoked")
    for key in with_stores(lambda stores: stores.keys().list(tenant)):
        table.add_row(key["key_id"], key["tenant"], " ".join(key["scopes"]), key["name"],
                      str(key["created_at"]), str(key["revoked_at"] or ""))
    console.print(table)


@app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")]) -> None:
    """Revoke a key (by its id, the part after `isk_`); it stops working at once."""
    if not with_stores(lambda stores: stores.keys().revoke(key_id)):
        fail(f"no key {key_id}")
    console.print(f"revoked {key_id}")
