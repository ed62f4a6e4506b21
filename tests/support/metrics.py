"""Prometheus metrics of a running worker or bridge, read from its /metrics page."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    """Every sample of a /metrics page: (name, labels) -> value."""
    async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when there is none (a counter not yet counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def summed(samples: Samples, name: str, by: str) -> dict[str, float]:
    """The samples named `name` summed by the value of their label `by`."""
    sums: dict[str, float] = {}
    for (sample, labels), number in samples.items():
        if sample == name:
            key = dict(labels)[by]
            sums[key] = sums.get(key, 0.0) + number
    return sums
