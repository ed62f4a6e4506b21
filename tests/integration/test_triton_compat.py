"""Triton clients against the bridge: readiness from worker heartbeats, model config, statistics,
the repository index, and every call of `tritonclient.http` either served or refused saying so."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import numpy as np
import pytest
from support.bridge import oip_inputs
from support.waiting import wait_for

from infra.local.harness import tiny_input

pytestmark = pytest.mark.integration
BEAT = {"heartbeat_interval_s": 0.5}  # heartbeats expire after 1.5 s


async def status_of(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def test_ready_only_while_a_worker_serves(start_worker, start_bridge):
    bridge = await start_bridge(**BEAT)
    url = bridge.url
    async with aiohttp.ClientSession() as session:
        for path in ("/v2/health/ready", "/v2/models/tiny/ready", "/v2/models/tiny/versions/1/ready"):
            status, body = await status_of(session, url + path)
            assert status == 503 and body["code"] == "UNAVAILABLE", (path, body)
        assert "no worker of group" in (await status_of(session, url + "/v2/health/ready"))[1]["error"]

        worker = start_worker(models=["tiny"], **BEAT)

        async def ready() -> bool:
            worker.check_running()
            return (await status_of(session, url + "/v2/health/ready"))[0] == 200

        await wait_for(ready, timeout=90, interval=0.2, what="server ready")
        for path in ("/v2/models/tiny/ready", "/v2/models/tiny/versions/1/ready"):
            status, body = await status_of(session, url + path)
            assert status == 200 and body["ready"] is True, (path, body)
        # Registered, but this worker does not serve it.
        status, body = await status_of(session, url + "/v2/models/efficientnet-lite0/ready")
        assert status == 503 and "no live worker serves efficientnet-lite0/1" in body["error"], body
        # Ready means answered: a request sent now is.
        x = tiny_input()["x"]
        request = {"inputs": oip_inputs(x)}
        async with session.post(f"{url}/v2/models/tiny/infer", json=request,
                                headers={"X-Inferstream-Timeout": "10"}) as r:
            assert r.status == 200, await r.text()

        worker.stop()  # a clean stop withdraws the heartbeat at once, without waiting for it to expire

        async def unready() -> bool:
            return (await status_of(session, url + "/v2/health/ready"))[0] == 503

        await wait_for(unready, timeout=10, interval=0.2, what="server unready after the worker stopped")
        assert (await status_of(session, url + "/v2/models/tiny/ready"))[0] == 503


async def test_a_killed_worker_stops_counting_when_its_heartbeat_expires(start_worker, start_bridge):
    worker = start_worker(models=["tiny"], **BEAT)
    bridge = await start_bridge(**BEAT)
    await bridge.wait_ready(90, path="/v2/health/ready")
    worker.kill()  # no withdrawal: the heartbeat expires after three intervals (1.5 s)
    async with aiohttp.ClientSession() as session:
        async def unready() -> bool:
            return (await status_of(session, bridge.url + "/v2/health/ready"))[0] == 503

        await wait_for(unready, timeout=5, interval=0.2, what="server unready after the worker was killed")
        status, body = await status_of(session, bridge.url + "/v2/models/tiny/versions/1/ready")
    assert status == 503 and "no live worker serves tiny/1" in body["error"], body


async def test_statistics_count_the_workers_inferences(start_worker, start_bridge):
    worker = start_worker(models=["tiny"], **BEAT)
    bridge = await start_bridge(**BEAT)
    await bridge.wait_ready(90, path="/v2/health/ready")
    url = bridge.url
    async with aiohttp.ClientSession() as session:
        status, before = await status_of(session, f"{url}/v2/models/tiny/versions/1/stats")
        assert status == 200, before
        (entry,) = before["model_stats"]
        assert entry["inference_count"] == 0 and entry["inference_stats"]["success"]["count"] == 0
        for i in range(5):
            x = tiny_input(rows=3, seed=i)["x"]
            body = {"inputs": oip_inputs(x)}
            async with session.post(f"{url}/v2/models/tiny/infer", json=body,
                                    headers={"X-Inferstream-Timeout": "10"}) as r:
                assert r.status == 200, await r.text()

        async def counted() -> bool:
            worker.check_running()
            stats = (await status_of(session, f"{url}/v2/models/tiny/stats"))[1]["model_stats"]
            return stats[0]["inference_stats"]["success"]["count"] >= 5

        await wait_for(counted, timeout=10, interval=0.2, what="statistics written")
        status, every = await status_of(session, f"{url}/v2/models/stats")
    assert status == 200
    (entry,) = [e for e in every["model_stats"] if e["name"] == "tiny" and e["version"] == "1"]
    assert {e["name"] for e in every["model_stats"]} >= {"tiny", "resnet18", "efficientnet-lite0"}
    inference = entry["inference_stats"]
    assert entry["inference_count"] == 15  # rows of the batch axis, as Triton counts
    assert inference["success"]["count"] == 5 and inference["success"]["ns"] > 0
    assert inference["compute_infer"]["count"] == 5 and inference["compute_infer"]["ns"] > 0
    assert inference["queue"]["count"] == 5 and inference["fail"]["count"] == 0
    assert 1 <= entry["execution_count"] <= 5 and entry["last_inference"] > 0
    assert sum(b["compute_infer"]["count"] for b in entry["batch_stats"]) == entry["execution_count"]


# Every public method of tritonclient.http.InferenceServerClient: what the bridge does with it.
SERVED = {
    "is_server_live", "is_server_ready", "is_model_ready", "get_server_metadata", "get_model_metadata",
    "get_model_config", "get_model_repository_index", "get_inference_statistics", "infer", "async_infer",
}
REFUSED = {  # refused with 400 UNSUPPORTED and a message saying so
    "load_model", "unload_model", "update_trace_settings", "get_trace_settings", "update_log_settings",
    "get_log_settings", "get_system_shared_memory_status", "register_system_shared_memory",
    "unregister_system_shared_memory", "get_cuda_shared_memory_status", "register_cuda_shared_memory",
    "unregister_cuda_shared_memory",
}
LOCAL = {  # the client's own work: no request reaches the server
    "close", "generate_request_body", "parse_response_body", "plugin", "register_plugin", "unregister_plugin",
}


def drive_every_call(address: str) -> dict[str, object]:
    """Every call of the client once: the answers of those served; the refused ones must raise
    InferenceServerException with 400 and a message saying the call is not supported."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(address, concurrency=2)
    x = tiny_input(rows=2, seed=3)["x"]
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    calls: dict[str, Callable[[], object]] = {
        "is_server_live": client.is_server_live,
        "is_server_ready": client.is_server_ready,
        "is_model_ready": lambda: client.is_model_ready("tiny") and client.is_model_ready("tiny", "1"),
        "get_server_metadata": client.get_server_metadata,
        "get_model_metadata": lambda: client.get_model_metadata("tiny"),
        "get_model_config": lambda: client.get_model_config("tiny"),
        "get_model_repository_index": client.get_model_repository_index,
        "get_inference_statistics": lambda: client.get_inference_statistics("tiny"),
        "infer": lambda: client.infer("tiny", [inp], headers={"X-Inferstream-Timeout": "10"}),
        "async_infer": lambda: client.async_infer("tiny", [inp], headers={"X-Inferstream-Timeout": "10"}).get_result(),
        "load_model": lambda: client.load_model("tiny"),
        "unload_model": lambda: client.unload_model("tiny"),
        "update_trace_settings": lambda: client.update_trace_settings("tiny", {"trace_level": ["TIMESTAMPS"]}),
        "get_trace_settings": client.get_trace_settings,
        "update_log_settings": lambda: client.update_log_settings({"log_verbose_level": 1}),
        "get_log_settings": client.get_log_settings,
        "get_system_shared_memory_status": client.get_system_shared_memory_status,
        "register_system_shared_memory": lambda: client.register_system_shared_memory("r", "/key", 64),
        "unregister_system_shared_memory": lambda: client.unregister_system_shared_memory("r"),
        "get_cuda_shared_memory_status": client.get_cuda_shared_memory_status,
        "register_cuda_shared_memory": lambda: client.register_cuda_shared_memory("r", b"handle", 0, 64),
        "unregister_cuda_shared_memory": client.unregister_cuda_shared_memory,
    }
    assert set(calls) == SERVED | REFUSED
    answers: dict[str, object] = {}
    try:
        for name in sorted(SERVED):
            answers[name] = calls[name]()
        for name in sorted(REFUSED):
            with pytest.raises(InferenceServerException) as refused:
                calls[name]()
            assert refused.value.status() == "400", (name, refused.value)
            assert "is not supported by inferstream" in refused.value.message(), (name, refused.value)
    finally:
        client.close()
    return answers


async def drive_the_aio_client(address: str) -> None:
    """tritonclient.http.aio: the same calls (it has no async_infer), the same answers."""
    import tritonclient.http.aio as aio
    from tritonclient.utils import InferenceServerException

    public = {name for name in dir(aio.InferenceServerClient) if not name.startswith("_")}
    assert public == (SERVED | REFUSED | LOCAL) - {"async_infer"}, sorted(public ^ (SERVED | REFUSED | LOCAL))
    client = aio.InferenceServerClient(address)
    x = tiny_input(rows=2, seed=3)["x"]
    inp = aio.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    try:
        assert await client.is_server_ready() and await client.is_model_ready("tiny", "1")
        assert (await client.get_model_config("tiny"))["name"] == "tiny"
        assert (await client.get_inference_statistics("tiny"))["model_stats"][0]["name"] == "tiny"
        assert any(e["name"] == "tiny" for e in await client.get_model_repository_index())
        result = await client.infer("tiny", [inp], headers={"X-Inferstream-Timeout": "10"})
        assert result.as_numpy("y").shape == (2, 16)
        for refused in (client.load_model("tiny"), client.unload_model("tiny"), client.get_trace_settings(),
                        client.update_log_settings({"log_verbose_level": 1}), client.get_log_settings(),
                        client.get_system_shared_memory_status(), client.unregister_system_shared_memory(),
                        client.register_system_shared_memory("r", "/key", 64),
                        client.get_cuda_shared_memory_status(), client.unregister_cuda_shared_memory(),
                        client.register_cuda_shared_memory("r", b"handle", 0, 64),
                        client.update_trace_settings("tiny", {"trace_level": ["TIMESTAMPS"]})):
            with pytest.raises(InferenceServerException) as error:
                await refused
            assert error.value.status() == "400" and "is not supported by inferstream" in error.value.message()
    finally:
        await client.close()


async def test_every_tritonclient_call_is_served_or_refused_saying_so(start_worker, start_bridge, settings):
    import tritonclient.http as triton
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    public = {name for name in dir(triton.InferenceServerClient) if not name.startswith("_")}
    assert public == SERVED | REFUSED | LOCAL, f"classify: {sorted(public - SERVED - REFUSED - LOCAL)}"

    start_worker(models=["tiny"], **BEAT)
    bridge = await start_bridge(**BEAT)
    await bridge.wait_ready(90, path="/v2/health/ready")
    # geventhttpclient: the client lives and is called in one thread.
    answers = await asyncio.to_thread(drive_every_call, bridge.url.removeprefix("http://"))
    await drive_the_aio_client(bridge.url.removeprefix("http://"))

    for check in ("is_server_live", "is_server_ready", "is_model_ready"):
        assert answers[check] is True
    config = answers["get_model_config"]
    assert isinstance(config, dict)
    pbtxt = text_format.Parse((settings.model_repository / "tiny" / "config.pbtxt").read_text(),
                              model_config_pb2.ModelConfig())
    ours = json_format.ParseDict(config, model_config_pb2.ModelConfig())  # Triton's schema, field for field
    assert (ours.name, ours.platform, ours.max_batch_size) == (pbtxt.name, pbtxt.platform, pbtxt.max_batch_size)
    for mine, theirs in zip([*ours.input, *ours.output], [*pbtxt.input, *pbtxt.output], strict=True):
        assert (mine.name, mine.data_type, list(mine.dims)) == (theirs.name, theirs.data_type, list(theirs.dims))
    assert ours.HasField("dynamic_batching")
    index = answers["get_model_repository_index"]
    assert {"name": "tiny", "version": "1", "state": "READY", "reason": ""} in index
    assert {"name": "resnet18", "version": "1", "state": "UNAVAILABLE",
            "reason": "no live worker serves it"} in index
    stats = answers["get_inference_statistics"]
    assert stats["model_stats"][0]["name"] == "tiny"
    for name in ("infer", "async_infer"):
        result = answers[name]
        assert result.as_numpy("y").shape == (2, 16)
    assert np.isfinite(answers["infer"].as_numpy("y")).all()


async def test_unsupported_routes_answer_json_errors_not_404(start_bridge):
    bridge = await start_bridge()
    async with aiohttp.ClientSession() as session:
        for method, path in (("POST", "/v2/repository/models/tiny/load"), ("GET", "/v2/logging"),
                             ("POST", "/v2/models/tiny/trace/setting"), ("GET", "/v2/cudasharedmemory/status"),
                             ("POST", "/v2/systemsharedmemory/region/r/unregister")):
            async with session.request(method, bridge.url + path) as r:
                body = await r.json()
                assert r.status == 400 and body["code"] == "UNSUPPORTED", (path, body)
                assert "is not supported by inferstream: " in body["error"]
        async with session.get(f"{bridge.url}/v2/models/nope/config") as r:
            assert r.status == 404 and (await r.json())["code"] == "UNKNOWN_MODEL"
