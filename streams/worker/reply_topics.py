"""Which topics a caller may name as `reply_to`.

A reply topic is a valid, bounded name outside the product's internal namespace (anything under
`<prefix>.` except the reply topics themselves, the broker's `__*` topics and the workers' own
`<app_id>-*` topics), and it must exist: the product never creates a topic because a caller named
it. Existence is read from the broker's topic list, cached, and refreshed when a name is missing
from it, at most once per `reply_topics_refresh_s`, so a flood of made-up names costs one
metadata request a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from streams.settings import Settings
from topics.errors import ErrorCode, EventError
from topics.names import Topics, valid_topic

ListTopics = Callable[[], Awaitable[set[str]]]


class ReplyTopics:
    def __init__(self, settings: Settings, list_topics: ListTopics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        topics = Topics(settings.topic_prefix)
        self.default = topics.replies
        self._internal = f"{settings.topic_prefix}."
        self._worker_prefix = f"{settings.app_id}-"
        self._list_topics = list_topics
        self._clock = clock
        self._max_age_s = settings.reply_topics_cache_s
        self._min_interval_s = settings.reply_topics_refresh_s
        self._known: set[str] = set()
        self._listed_at: float | None = None
        self._lock = asyncio.Lock()

    def problem(self, name: str) -> str | None:
        """Why `name` can never be a reply topic, or None."""
        if not valid_topic(name):
            return f"reply_to {name[:100]!r} is not a valid topic name (1-200 of A-Z a-z 0-9 . _ -)"
        own = name == self.default or name.startswith(f"{self.default}.")
        if (name.startswith(self._internal) and not own) or name.startswith(("__", self._worker_prefix)):
            return f"reply_to {name!r} is an internal topic"
        return None

    async def check(self, name: str) -> None:
        """Raise INVALID_REPLY_TO unless `name` is an existing topic a caller may reply to."""
        problem = self.problem(name)
        if problem is None and not await self._exists(name):
            problem = f"reply_to topic {name!r} does not exist; create it before sending requests"
        if problem is not None:
            raise EventError(ErrorCode.INVALID_REPLY_TO, problem)

    def resolve(self, name: str | None) -> str:
        """Where an answer to `name` goes without waiting: `name` when it passed the checks
        (it is known to exist), else the default replies topic."""
        if name and self.problem(name) is None and name in self._known:
            return name
        return self.default

    async def _exists(self, name: str) -> bool:
        if name in self._known and not self._stale(self._max_age_s):
            return True
        async with self._lock:
            if self._stale(self._min_interval_s) and (name not in self._known or self._stale(self._max_age_s)):
                self._known = await self._list_topics()
                self._listed_at = self._clock()
        return name in self._known

    def _stale(self, age_s: float) -> bool:
        return self._listed_at is None or self._clock() - self._listed_at >= age_s
