"""Inference statistics per model version, in Triton's format, from every worker.

Each worker counts in memory what its inference stage does (`ModelStats.success`, `.failure`,
`.execution`: no I/O on the request path) and adds the counts to Redis hashes at every heartbeat
(`flush`): `{prefix}:model-stats:{model}:{version}`, one field per counter, summed over the
workers by HINCRBY. When Redis cannot take them the counts stay in memory for the next flush (a
sum, so bounded), the failed flush is counted and logged once per outage, and no request waits
or fails for it. The bridge reads the hashes (`read`) and answers `GET /v2/models/.../stats` in
the form tritonclient's `get_inference_statistics` returns (`triton_stats`).

Times, per request as Triton counts them:
- success / fail: from the request's creation (at the bridge or client) to its reply;
- queue: from its creation to the start of its batch's run (Kafka hops, batch formation);
- compute_infer: its batch's backend call. Input and output handling happen in the batch call
  and are not counted apart (compute_input and compute_output stay 0), nor is there a cache.
`inference_count` counts rows of the batch axis (each inference of a batched request), as
Triton does; `execution_count` counts backend calls, and `batch_stats` those calls by the number
of requests they carried.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

MS_NS = 1_000_000
# The request counters of Triton's inference_stats, in its order.
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
LAST = "last_inference"  # ms since the epoch; the newest across workers

# KEYS[1]: a version's hash. ARGV: last_inference ms, then field/increment pairs.
FLUSH_LUA = """
local last = tonumber(ARGV[1])
if last > 0 and last > tonumber(redis.call('HGET', KEYS[1], 'last_inference') or '0') then
  redis.call('HSET', KEYS[1], 'last_inference', last)
end
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"""


def stats_key(prefix: str, model: str, version: str) -> str:
    return f"{prefix}:model-stats:{model}:{version}"


class ModelStats:
    """Counters per (model, version), added to Redis by `flush`."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._last: dict[tuple[str, str], int] = {}
        self.unavailable_count = 0  # flushes Redis could not take
        self._store_up = True

    def _add(self, model: str, version: str, **fields: int) -> None:
        counts = self._counts[(model, version)]
        for name, value in fields.items():
            counts[name] += value

    def success(self, model: str, version: str, rows: int, total_ms: float, compute_ms: float, now_ms: int) -> None:
        """A request answered: `rows` inferences, created `total_ms` ago, its batch ran `compute_ms`."""
        total_ns, compute_ns = round(max(total_ms, 0) * MS_NS), round(max(compute_ms, 0) * MS_NS)
        self._add(model, version, inference_count=rows, success_count=1, success_ns=total_ns,
                  queue_count=1, queue_ns=max(total_ns - compute_ns, 0),
                  compute_infer_count=1, compute_infer_ns=compute_ns)
        self._last[(model, version)] = max(self._last.get((model, version), 0), now_ms)

    def failure(self, model: str, version: str, total_ms: float) -> None:
        self._add(model, version, fail_count=1, fail_ns=round(max(total_ms, 0) * MS_NS))

    def execution(self, model: str, version: str, batch_size: int, compute_s: float) -> None:
        """A backend call that ran `batch_size` requests."""
        self._add(model, version, execution_count=1, **{f"batch:{batch_size}:count": 1,
                                                        f"batch:{batch_size}:ns": round(compute_s * 1e9)})

    def pending(self) -> dict[tuple[str, str], dict[str, int]]:
        return {key: dict(counts) for key, counts in self._counts.items()}

    async def flush(self, redis: aioredis.Redis, prefix: str) -> bool:
        """Add the counts to Redis; False (counts kept for the next flush) when it cannot."""
        if not self._counts:
            return True
        counts, last = self._counts, self._last
        self._counts, self._last = defaultdict(lambda: defaultdict(int)), {}
        script = redis.register_script(FLUSH_LUA)
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for (model, version), fields in counts.items():
                    args: list[int | str] = [last.get((model, version), 0)]
                    for name, value in fields.items():
                        args += [name, value]
                    await script(keys=[stats_key(prefix, model, version)], args=args, client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._merge(counts, last)
            self.unavailable_count += 1
            if self._store_up:
                self._store_up = False
                log.warning("model statistics not written: Redis unavailable (%r); kept for the next try", exc)
            return False
        if not self._store_up:
            self._store_up = True
            log.info("model statistics written again")
        return True

    def _merge(self, counts: dict[tuple[str, str], dict[str, int]], last: dict[tuple[str, str], int]) -> None:
        for (model, version), fields in counts.items():
            self._add(model, version, **fields)
        for key, ms in last.items():
            self._last[key] = max(self._last.get(key, 0), ms)


# The worker process's counters, recorded by its inference stage and batchers.
STATS = ModelStats()


async def read(redis: aioredis.Redis, prefix: str, versions: Iterable[tuple[str, str]]) -> list[dict]:
    """Triton's model_stats entries of the given (model, version)s; raises RedisError."""
    versions = list(versions)
    async with redis.pipeline(transaction=False) as pipe:
        for model, version in versions:
            pipe.hgetall(stats_key(prefix, model, version))
        hashes = await pipe.execute()
    return [triton_stats(model, version, {_text(k): int(v) for k, v in raw.items()})
            for (model, version), raw in zip(versions, hashes)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def triton_stats(model: str, version: str, fields: dict[str, int]) -> dict:
    """One entry of Triton's `model_stats` from a version's counters."""

    def duration(name: str) -> dict[str, int]:
        return {"count": fields.get(f"{name}_count", 0), "ns": fields.get(f"{name}_ns", 0)}

    sizes = sorted({int(name.split(":")[1]) for name in fields if name.startswith("batch:")})
    return {
        "name": model,
        "version": version,
        "last_inference": fields.get(LAST, 0),
        "inference_count": fields.get("inference_count", 0),
        "execution_count": fields.get("execution_count", 0),
        "inference_stats": {name: duration(name) for name in DURATIONS},
        "batch_stats": [
            {"batch_size": size, "compute_input": {"count": 0, "ns": 0},
             "compute_infer": {"count": fields.get(f"batch:{size}:count", 0), "ns": fields.get(f"batch:{size}:ns", 0)},
             "compute_output": {"count": 0, "ns": 0}}
            for size in sizes
        ],
        "memory_usage": [],
    }
