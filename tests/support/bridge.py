"""Calls on a running bridge over HTTP, as an Open Inference Protocol client makes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np

from infra.local.harness import tiny_input
from support.waiting import wait_for


def oip_inputs(x: np.ndarray, name: str = "x") -> list[dict[str, Any]]:
    """An FP32 tensor as the "inputs" of an OIP JSON request (or of a job)."""
    return [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]


async def infer_json(session: aiohttp.ClientSession, url: str, x: np.ndarray, **headers: str) -> tuple[int, dict]:
    """POST tiny's input `x` to the bridge at `url`; the status and the JSON answer."""
    async with session.post(f"{url}/v2/models/tiny/infer", json={"inputs": oip_inputs(x)}, headers=headers) as r:
        return r.status, await r.json()


async def until_answering(session: aiohttp.ClientSession, url: str, timeout: float = 90.0) -> None:
    """Until the bridge answers a tiny request: a worker has joined its groups and the bridge
    has the model."""

    async def answered() -> bool:
        status, _ = await infer_json(session, url, tiny_input()["x"], **{"X-Inferstream-Timeout": "3"})
        return status == 200

    await wait_for(answered, timeout=timeout, interval=0.2, what=f"an answer through the bridge at {url}")


async def poll_json(session: aiohttp.ClientSession, url: str, done: Callable[[dict], object], *,
                    timeout: float = 180.0, headers: dict[str, str] | None = None) -> dict:
    """GET `url` (a job's or a batch's state, answered 200) until `done(body)`; that body."""

    async def state() -> dict:
        async with session.get(url, headers=headers or {}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    return await wait_for(state, timeout=timeout, interval=0.5, until=done, what=f"{url} done")
