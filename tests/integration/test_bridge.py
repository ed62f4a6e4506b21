"""The HTTP bridge on the real stack: Open Inference Protocol, classify, jobs, batches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import skimage.data
from support.batch_files import put_jsonl, read_output
from support.bridge import infer_json, oip_inputs, poll_json, until_answering
from support.metrics import scrape, value
from support.tiny import tiny_reference
from support.waiting import wait_for

from infra.local.harness import tiny_input

pytestmark = pytest.mark.integration
CHELSEA = Path(skimage.data.__file__).parent / "chelsea.png"


async def test_tritonclient_infers_through_the_bridge(start_worker, start_bridge):
    import tritonclient.http.aio as triton

    start_worker()
    bridge = await start_bridge()
    await bridge.wait_ready(90, path="/v2/health/ready")  # a worker is live
    client = triton.InferenceServerClient(bridge.url.removeprefix("http://"))
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("tiny")
        meta = await client.get_model_metadata("tiny")
        assert meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["datatype"] == "FP32"
        x = tiny_input(rows=4, seed=11)["x"]
        for binary in (True, False):
            inp = triton.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = triton.InferRequestedOutput("y", binary_data=binary)
            result = None
            for _ in range(30):  # the worker may still be joining its group
                try:
                    result = await client.infer("tiny", [inp], outputs=[out])
                    break
                except Exception as exc:  # noqa: BLE001
                    if "DEADLINE" not in str(exc) and "deadline" not in str(exc):
                        raise
            assert result is not None
            np.testing.assert_allclose(result.as_numpy("y"), tiny_reference(x), rtol=1e-5, atol=1e-6)
    finally:
        await client.close()


async def test_classify_labels_the_chelsea_photo_a_cat(start_worker, start_bridge):
    start_worker()
    bridge = await start_bridge()
    async with aiohttp.ClientSession() as session:
        await until_answering(session, bridge.url)
        async with session.post(f"{bridge.url}/v1/models/efficientnet-lite0/classify?top_k=3",
                                data=CHELSEA.read_bytes(), headers={"Content-Type": "image/png"}) as r:
            assert r.status == 200, await r.text()
            raw = await r.json()
        form = aiohttp.FormData()
        form.add_field("image", CHELSEA.read_bytes(), filename="chelsea.png", content_type="image/png")
        async with session.post(f"{bridge.url}/v1/models/efficientnet-lite0/classify", data=form) as r:
            multipart = await r.json()
        async with session.post(f"{bridge.url}/v1/models/efficientnet-lite0/classify", data=b"not an image") as r:
            refused = await r.json()
            assert r.status == 400 and refused["code"] == "INVALID_IMAGE" and "0x" not in refused["error"], refused
    assert len(raw["predictions"]) == 3 and len(multipart["predictions"]) == 5
    for answer in (raw, multipart):
        assert 281 <= answer["predictions"][0]["class"] <= 285, answer
        assert "cat" in answer["predictions"][0]["label"]


async def test_two_hundred_concurrent_requests_all_answered_correctly(start_worker, start_bridge):
    start_worker()
    bridge = await start_bridge()
    inputs = [tiny_input(rows=1, seed=i)["x"] for i in range(200)]
    async with aiohttp.ClientSession() as session:
        await until_answering(session, bridge.url)
        answers = await asyncio.gather(*(infer_json(session, bridge.url, x) for x in inputs))
    expected = tiny_reference(np.concatenate(inputs))
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        (output,) = body["outputs"]
        np.testing.assert_allclose(np.array(output["data"], np.float32), expected[i], rtol=1e-5, atol=1e-6)


async def test_deadline_gives_504_and_no_waiter_leaks(start_worker, start_bridge):
    # A batcher that waits 4 s to fill a batch makes the model slower than a 1 s deadline.
    start_worker(max_batch_size=1000, max_batch_delay_ms=4000)
    bridge = await start_bridge()
    async with aiohttp.ClientSession() as session:
        async def answered() -> bool:  # the slow reply arrives within 30 s once the worker is up
            status, _ = await infer_json(session, bridge.url, tiny_input()["x"], **{"X-Inferstream-Timeout": "30"})
            return status == 200

        await wait_for(answered, timeout=180, interval=0, what="a first answer through the bridge")
        statuses = await asyncio.gather(*(
            infer_json(session, bridge.url, tiny_input(seed=i)["x"], **{"X-Inferstream-Timeout": "1"})
            for i in range(5)
        ))
        for status, body in statuses:
            assert status == 504, body
            assert body["code"] == "DEADLINE_EXCEEDED" and "deadline" in body["error"]
        # The late replies arrive and are dropped: no waiter is left behind.
        await wait_for(lambda: scrape(f"{bridge.url}/metrics"), timeout=30, interval=0.2,
                       until=lambda samples: value(samples, "inferstream_bridge_late_replies_total") >= 1
                       and value(samples, "inferstream_bridge_pending_replies") == 0,
                       what="late replies dropped and none pending")


async def test_two_bridges_get_only_their_own_replies(start_worker, start_bridge, settings):
    start_worker()
    first, second = await start_bridge(), await start_bridge()
    async with aiohttp.ClientSession() as session:
        await until_answering(session, first.url)
        await until_answering(session, second.url)
        xs = [tiny_input(seed=100 + i)["x"] for i in range(100)]
        answers = await asyncio.gather(*(
            infer_json(session, (first if i % 2 else second).url, x) for i, x in enumerate(xs)
        ))
        expected = tiny_reference(np.concatenate(xs))
        for i, (status, body) in enumerate(answers):
            assert status == 200, body
            output = np.array(body["outputs"][0]["data"], np.float32)
            np.testing.assert_allclose(output, expected[i], rtol=1e-5, atol=1e-6)
        for bridge in (first, second):
            samples = await scrape(f"{bridge.url}/metrics")
            assert ("inferstream_bridge_unmatched_replies_total", frozenset()) in samples
            assert value(samples, "inferstream_bridge_unmatched_replies_total") == 0, \
                "a bridge saw a reply that was not its own"
    assert first.settings.bridge_port != second.settings.bridge_port


async def test_limits_and_errors_are_json_with_a_code(start_worker, start_bridge):
    bridge = await start_bridge(bridge_max_body_bytes=100_000, bridge_max_elements=1000)
    async with aiohttp.ClientSession() as session:
        cases = [
            ("/v2/models/nope/infer", {"inputs": []}, 404, "UNKNOWN_MODEL"),
            ("/v2/models/tiny/infer", b"{not json", 400, "INVALID_REQUEST"),
            ("/v2/models/tiny/infer", {"inputs": [{"name": "x", "shape": [100, 16], "datatype": "FP32",
                                                   "data": [0.0] * 1600}]}, 400, "INVALID_REQUEST"),
            ("/v2/models/tiny/infer", {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32",
                                                   "data": [0.0] * 5}]}, 400, "INVALID_TENSOR"),
            ("/v2/models/tiny/infer", b"[" * 5000 + b"]" * 5000, 400, "INVALID_REQUEST"),
            ("/v2/models/tiny/infer", b"x" * 200_000, 413, "PAYLOAD_TOO_LARGE"),
            ("/v1/jobs/does-not-exist", None, 404, "NOT_FOUND"),
        ]
        for path, body, status, code in cases:
            method = session.get if body is None else session.post
            kwargs = {} if body is None else ({"json": body} if isinstance(body, dict) else {"data": body})
            async with method(f"{bridge.url}{path}", **kwargs) as r:
                answer = await r.json()
                assert (r.status, answer["code"]) == (status, code), (path, answer)
                assert answer["error"] and "Traceback" not in answer["error"]
        async with session.get(f"{bridge.url}/openapi.json") as r:
            doc = await r.json()
    routes = {"/v2/models/{model}/infer", "/v1/jobs", "/v1/batches/{batch_id}", "/v1/models/{model}/classify"}
    assert routes <= set(doc["paths"])


async def test_job_completes_with_its_result_in_postgres_and_s3(start_worker, start_bridge):
    start_worker(claim_check_bytes=4096)
    bridge = await start_bridge()
    small, large = tiny_input(rows=2, seed=5)["x"], tiny_input(rows=200, seed=6)["x"]
    async with aiohttp.ClientSession() as session:
        await until_answering(session, bridge.url)
        ids = []
        for x in (small, large):
            job = {"model": "tiny", "inputs": oip_inputs(x)}
            async with session.post(f"{bridge.url}/v1/jobs", json=job) as r:
                assert r.status == 202, await r.text()
                ids.append((await r.json())["job_id"])
        finished = lambda body: body["status"] != "pending"  # noqa: E731
        small_job = await poll_json(session, f"{bridge.url}/v1/jobs/{ids[0]}", finished)
        large_job = await poll_json(session, f"{bridge.url}/v1/jobs/{ids[1]}", finished)
        async with session.get(large_job["outputs_url"]) as r:  # presigned S3 URL
            assert r.status == 200
            bundle = await r.read()
    assert small_job["status"] == "completed", small_job
    np.testing.assert_allclose(np.array(small_job["outputs"][0]["data"], np.float32).reshape(2, 16),
                               tiny_reference(small), rtol=1e-5, atol=1e-6)
    assert large_job["status"] == "completed" and large_job["outputs_ref"].startswith("s3://")
    from topics.events import decode_bundle

    _, tensors = decode_bundle(bundle)
    np.testing.assert_allclose(tensors["y"], tiny_reference(large), rtol=1e-5, atol=1e-6)


async def test_batch_of_500_completes_with_output_in_s3(start_worker, start_bridge, settings):
    start_worker()
    bridge = await start_bridge()
    xs = [tiny_input(seed=1000 + i)["x"] for i in range(500)]
    uri = put_jsonl(settings, f"inputs/{settings.app_id}/batch.jsonl", xs, bad_lines=1)
    async with aiohttp.ClientSession() as session:
        await until_answering(session, bridge.url)
        async with session.post(f"{bridge.url}/v1/batches", json={"model": "tiny", "input": uri, "rate": 1000}) as r:
            assert r.status == 202, await r.text()
            batch_id = (await r.json())["batch_id"]
        batch = await poll_json(session, f"{bridge.url}/v1/batches/{batch_id}", lambda b: b["status"] == "completed")
    assert (batch["total"], batch["done"], batch["failed"]) == (501, 500, 1), batch
    lines = read_output(settings, batch["output"])
    assert [line["index"] for line in lines] == list(range(501))
    expected = tiny_reference(np.concatenate(xs))
    for line in lines[:500]:
        assert line["status"] == "ok" and line["id"] == f"item-{line['index']}"
        np.testing.assert_allclose(np.array(line["outputs"][0]["data"], np.float32), expected[line["index"]],
                                   rtol=1e-5, atol=1e-6)
    assert lines[500]["status"] == "error" and lines[500]["id"] == "broken"


async def test_batch_finishes_after_its_worker_is_killed_midway(start_worker, start_bridge, settings):
    worker = start_worker()
    bridge = await start_bridge()
    xs = [tiny_input(seed=2000 + i)["x"] for i in range(500)]
    uri = put_jsonl(settings, f"inputs/{settings.app_id}/killed.jsonl", xs)
    async with aiohttp.ClientSession() as session:
        await until_answering(session, bridge.url)
        async with session.post(f"{bridge.url}/v1/batches", json={"model": "tiny", "input": uri, "rate": 100}) as r:
            batch_id = (await r.json())["batch_id"]
        url = f"{bridge.url}/v1/batches/{batch_id}"
        midway = await poll_json(session, url, lambda b: b["published"] >= 100, timeout=60)
        worker.kill()
        assert midway["status"] == "running" and midway["published"] < 500, midway
        start_worker()
        batch = await poll_json(session, url, lambda b: b["status"] == "completed")
    assert (batch["total"], batch["done"], batch["failed"]) == (500, 500, 0), batch
    lines = read_output(settings, batch["output"])
    assert sorted(line["index"] for line in lines) == list(range(500))  # every item exactly once
    assert len({line["request_id"] for line in lines}) == 500


async def test_broker_outage_gives_503_quickly(start_bridge, settings, tmp_path):
    """A bridge whose broker goes away answers 503 within seconds instead of hanging."""
    from infra.local.stack import LocalStack, free_port
    from streams.worker.app import bootstrap_registry

    broker_port = free_port()
    own = settings.model_copy(update={"broker_port": broker_port, "kafka_bootstrap": f"127.0.0.1:{broker_port}"})
    broker = LocalStack(own, broker_storage="memory", state_dir=tmp_path / "broker")
    broker.broker_up()
    try:
        await bootstrap_registry(own)  # the bridge learns the models from this broker's registry topic
        bridge = await start_bridge(broker_port=broker_port, kafka_bootstrap=own.kafka_bootstrap, produce_timeout_s=2.0)
        broker.broker_down()
        async with aiohttp.ClientSession() as session:
            started = asyncio.get_running_loop().time()
            status, body = await infer_json(session, bridge.url, tiny_input()["x"])
            elapsed = asyncio.get_running_loop().time() - started
            async with session.get(f"{bridge.url}/v2/health/ready") as r:
                ready_status = r.status
    finally:
        broker.broker_down()
    assert (status, body["code"]) == (503, "UNAVAILABLE"), body
    assert elapsed < 10, f"503 took {elapsed:.1f} s"
    assert ready_status == 503


async def test_start_and_stop_are_idempotent(topics_ready):
    """A second start makes nothing again, and a second stop closes nothing again: aiohttp's
    startup and cleanup may meet a bridge its owner already started or stopped."""
    from streams.bridge.app import Bridge

    bridge = Bridge(topics_ready)
    await bridge.start()
    pool, stores = bridge.db.pool, bridge.stores
    await bridge.start()
    assert (bridge.db.pool, bridge.stores) == (pool, stores)
    await bridge.stop()
    await bridge.stop()
