"""Version choice by weight, free of I/O: a sticky weighted choice among a model's versions
(canaries, A/B), the same in every process."""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Mapping
from itertools import accumulate


def version_order(version: str) -> tuple[int, int, str]:
    """Numeric versions in numeric order ("2" before "10"), then any others by name."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def choose(weights: Mapping[str, int], key: str) -> str:
    """The version that serves `key`: the same key always lands on the same version while the
    weights do not change, and keys spread over versions in proportion to their weights."""
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must not be negative: {dict(weights)}")
    total = sum(weights.values())
    if total == 0:
        raise ValueError("no version has a positive weight")
    # blake2b, not hash(): Python salts str hashes per process, and every worker must agree.
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") % total
    versions = sorted(weights, key=version_order)
    bounds = list(accumulate(weights[v] for v in versions))
    # bisect_right skips zero weights: their bound equals the one before them.
    return versions[bisect_right(bounds, point)]
