"""`inferstream topics`: the Kafka topics of the contract."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from streams.cli.common import CommandGroup, console, get_settings

if TYPE_CHECKING:
    from streams.settings import Settings

app = CommandGroup(name="topics", help="Create the Kafka topics of the contract.")


def create_topics(settings: Settings, quiet: bool = False) -> None:
    from streams.kafka.admin import ensure_topics
    from streams.registry.records import ModelRegistry

    models = ModelRegistry.load(settings.model_repository).names
    created = asyncio.run(ensure_topics(settings, models))
    if not quiet:
        console.print(f"topics: created {created}" if created else "topics: all present")


@app.command("create")
def topics_create() -> None:
    """Create the requests, replies, results, dead-letter and per-model topics."""
    create_topics(get_settings())
