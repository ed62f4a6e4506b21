"""`inferstream dlq`: the dead-letter topic, read without a consumer group."""

from __future__ import annotations

import asyncio
from typing import Annotated, Optional

import typer
from rich.table import Table

from streams.cli.common import CommandGroup, console, fail, get_settings, refusing

app = CommandGroup(name="dlq", help="Dead letters: list, show, redrive.")


@app.command("list")
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


@app.command("show")
def dlq_show(position: Annotated[str, typer.Argument(help="PARTITION:OFFSET in the dead-letter topic")]) -> None:
    """One dead letter with its original event decoded."""
    from streams.ops.dlq import describe, read_letters, select
    from streams.ops.replay import parse_positions
    from streams.storage.objects import ObjectStore

    with refusing(ValueError):
        ((partition, offset),) = parse_positions([position])
    settings = get_settings()
    found = select(asyncio.run(read_letters(settings)), positions={(partition, offset)})
    if not found:
        fail(f"no dead letter at {position}")
    console.print_json(data=asyncio.run(describe(ObjectStore(settings), found[0])))


@app.command("redrive")
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
        fail("name the letters: --offset P:O, --reason CODE or --all")
    with refusing(ValueError):
        positions = set(parse_positions(position)) if position else None
    settings = get_settings()
    letters = select(asyncio.run(read_letters(settings)), positions=positions,
                     reasons=set(reason) if reason else None)
    try:
        sent, skipped = asyncio.run(redrive(settings, letters))
    except StoreUnreachable as exc:
        fail(printable(str(exc)))
    for x in sent:
        note = " (redacted: sent without its credentials)" if x.letter.redacted else ""
        console.print(escape(printable(f"redriven {x.position} ({x.letter.reason.value}, {x.letter.request_id})"
                                       f" -> {x.letter.source_topic}{note}")))
    for skip in skipped:
        console.print(escape(printable(f"skipped {skip.record.position}: {skip.why}")))
    console.print(f"redriven {len(sent)}, skipped {len(skipped)}")
