"""`inferstream`: the runtime's command line, one module per command group. The checkout's dev
commands (the main job, the local stack, model builds) are `python -m infra.local`."""

from __future__ import annotations

from typing import NoReturn

from streams.cli import dlq, keys, limits, models, requests, serve, topics
from streams.cli.common import command_line, run

app = command_line("inferstream: Kafka-native inference.",
                   [serve.app, requests.app, models.app, topics.app, keys.app, limits.app, dlq.app])


def main() -> NoReturn:
    """The `inferstream` entry point."""
    run(app)
