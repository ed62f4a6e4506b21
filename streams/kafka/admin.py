"""Create the contract's topics (idempotent): partitions and retention from `topics.names`."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.settings import Settings
from topics.names import Topics, TopicSpec


async def ensure_topics(settings: Settings, models: list[str], extra: Sequence[TopicSpec] = ()) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    specs = [*Topics(settings.topic_prefix).specs(models, settings), *extra]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(
                        s.name, s.partitions, 1,
                        topic_configs={"cleanup.policy": "compact"} if s.compacted
                        else {"retention.ms": str(s.retention_ms)},
                    )
                    for s in missing
                ]
            )
        return [s.name for s in missing]
    finally:
        await admin.close()
