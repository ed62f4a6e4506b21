"""The walking skeleton end to end on the real stack: request events in, predictions out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import orjson
import pytest
import skimage.data
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from support.cli_process import run_cli
from support.deadletters import dead_letters_of
from support.tiny import tiny_reference

from infra.local.harness import tiny_input, wait_ready
from streams.client import InferenceClient
from streams.storage.objects import ObjectStore
from streams.storage.results import ResultsStore
from topics import events
from topics.names import Topics

pytestmark = pytest.mark.integration
CHELSEA = Path(skimage.data.__file__).parent / "chelsea.png"


async def test_tiny_request_gets_the_models_answer(start_worker, settings):
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        inputs = tiny_input(rows=3, seed=7)
        result = await client.infer("tiny", inputs, timeout=30)
    assert result.header.status == "ok", result.header.error
    assert result.header.model_version == "1"
    assert {"queue", "inference", "total"} <= set(result.header.timings_ms)
    np.testing.assert_allclose(result.tensors["y"], tiny_reference(inputs["x"]), rtol=1e-5, atol=1e-6)


async def rows_for(settings, request_ids: list[str]) -> list:
    """Result rows of these requests, once all are stored (the sink is async) or after a minute."""
    async with ResultsStore(settings.postgres_dsn) as results:
        return list((await results.wait_until_stored(request_ids)).values())


async def test_chelsea_photo_is_a_cat(start_worker, settings):
    from streams.registry.records import ModelRegistry
    from streams.serving.images import (
        image_to_tensor,
        load_image,
        load_labels,
        probabilities,
        top_k,
    )

    info = ModelRegistry.load(settings.model_repository).resolve("efficientnet-lite0")
    image = load_image(CHELSEA)
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        result = await client.infer(
            "efficientnet-lite0", {"input": image_to_tensor(image, info.preprocessing)}, timeout=60
        )
    assert result.header.status == "ok", result.header.error
    probs = probabilities(result.tensors["logits"], info.postprocessing)[0]
    best = top_k(probs, load_labels(info.model_dir, info.model_dump()), k=5)
    assert 281 <= best[0][0] <= 285, best  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert "cat" in best[0][1]


async def test_thousand_requests_from_a_plain_kafka_client(start_worker, settings):
    """Any Kafka client: JSON request events in, replies and one PostgreSQL row per request out."""
    topics = Topics(settings.topic_prefix)
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)

    replies = AIOKafkaConsumer(topics.replies, bootstrap_servers=settings.kafka_bootstrap,
                               auto_offset_reset="latest", group_id=f"{settings.app_id}-reader")
    await replies.start()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=10)
    await producer.start()
    try:
        while not replies.assignment():
            await replies.getmany(timeout_ms=200)
        for tp in replies.assignment():
            await replies.position(tp)
        ids = [f"plain-{settings.app_id}-{i}" for i in range(1000)]
        rng = np.random.default_rng(1)
        for request_id in ids:
            body = {"request_id": request_id, "model": "tiny", "correlation_id": request_id,
                    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 16],
                                "data": rng.standard_normal(16).round(3).tolist()}]}
            await producer.send(topics.requests, orjson.dumps(body), key=request_id.encode())
        await producer.flush()
        answered: set[str] = set()
        wanted = set(ids)
        deadline = asyncio.get_running_loop().time() + 120
        while len(answered) < len(ids) and asyncio.get_running_loop().time() < deadline:
            for records in (await replies.getmany(timeout_ms=500)).values():
                for record in records:
                    result = events.decode_result(record.value)
                    if result.header.correlation_id not in wanted:
                        continue  # a warm-up request's late (expired) answer
                    assert result.header.status == "ok", result.header.error
                    answered.add(result.header.correlation_id)
    finally:
        await producer.stop()
        await replies.stop()
    assert answered == set(ids)
    rows = await rows_for(settings, ids)
    assert len(rows) == 1000
    assert {r["request_id"] for r in rows} == set(ids)
    assert all(r["status"] == "ok" and r["outputs"] for r in rows)


async def test_large_output_goes_to_s3_by_reference(start_worker, settings):
    worker = start_worker(claim_check_bytes=4096)
    inputs = tiny_input(rows=512, seed=3)  # 512 x 16 float32 outputs = 32 KiB > 4 KiB
    async with InferenceClient(settings.model_copy(update={"claim_check_bytes": 1 << 20})) as client:
        await wait_ready(client, worker)
        result = await client.infer("tiny", inputs, timeout=30)
        assert result.header.status == "ok", result.header.error
        assert result.header.outputs_ref.startswith(f"s3://{settings.s3_bucket}/results/tiny/")
        assert result.tensors == {}
        outputs = await client.outputs(result)
    np.testing.assert_allclose(outputs["y"], tiny_reference(inputs["x"]), rtol=1e-5, atol=1e-6)
    (row,) = await rows_for(settings, [result.header.request_id])
    assert row["outputs_ref"] == result.header.outputs_ref and row["outputs"] is None
    _, stored = events.decode_bundle(ObjectStore(settings).get(row["outputs_ref"]))
    np.testing.assert_array_equal(stored["y"], outputs["y"])


async def test_large_input_travels_by_reference(start_worker, settings):
    worker = start_worker()
    inputs = tiny_input(rows=1000, seed=4)  # 64 KB of input over a 16 KB claim-check limit
    async with InferenceClient(settings.model_copy(update={"claim_check_bytes": 16384})) as client:
        await wait_ready(client, worker)
        request = client.request("tiny")
        waiter = await client.send(request, inputs)
        result = await asyncio.wait_for(waiter, 30)
        outputs = await client.outputs(result)
    assert request.inputs_ref and request.inputs_ref.startswith("s3://")
    assert result.header.status == "ok", result.header.error
    np.testing.assert_allclose(outputs["y"], tiny_reference(inputs["x"]), rtol=1e-5, atol=1e-6)


async def test_bad_events_go_to_the_dead_letter_topic_and_the_pipeline_goes_on(start_worker, settings):
    topics = Topics(settings.topic_prefix)
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
        await producer.start()
        try:
            garbage = b"\x89PNG not an event"
            await producer.send_and_wait(topics.requests, garbage)
            wrong_shape = client.request("tiny")
            bad_shape_waiter = await client.send(wrong_shape, {"x": np.zeros((1, 5), np.float32)})
            unknown = client.request("no-such-model")
            unknown_waiter = await client.send(unknown, tiny_input())
        finally:
            await producer.stop()
        bad_shape, missing_model = await asyncio.wait_for(
            asyncio.gather(bad_shape_waiter, unknown_waiter), 30
        )
        good = await client.infer("tiny", tiny_input(seed=9), timeout=30)

    assert bad_shape.header.status == "error" and bad_shape.header.error.code == "INVALID_TENSOR"
    assert "shape" in bad_shape.header.error.message
    assert missing_model.header.error.code == "UNKNOWN_MODEL"
    assert good.header.status == "ok"

    # Only this test's events: warm-up requests sent before the worker joined may expire too.
    letters = [x.letter for x in (await dead_letters_of(
        settings, {None, wrong_shape.request_id, unknown.request_id}, timeout=30)).values()]
    by_reason = {letter.reason: letter for letter in letters}
    assert set(by_reason) == {"UNDECODABLE", "INVALID_TENSOR", "UNKNOWN_MODEL"}, letters
    assert by_reason["UNDECODABLE"].original == garbage
    assert by_reason["UNDECODABLE"].source_topic == topics.requests
    assert by_reason["INVALID_TENSOR"].request_id == wrong_shape.request_id
    assert by_reason["UNKNOWN_MODEL"].request_id == unknown.request_id
    assert all(letter.message for letter in letters)
    assert worker.proc.poll() is None

    rows = await rows_for(settings, [wrong_shape.request_id, unknown.request_id])
    assert sorted(r["error_code"] for r in rows) == ["INVALID_TENSOR", "UNKNOWN_MODEL"]


async def test_expired_deadline_is_rejected(start_worker, settings):
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        request = client.request("tiny")
        request.deadline_ms = events.now_ms() - 1000
        result = await asyncio.wait_for(await client.send(request, tiny_input()), 30)
    assert result.header.error.code == "DEADLINE_EXCEEDED"


async def test_cli_infer_prints_the_top_labels(start_worker, settings):
    """The README's `inferstream infer` against a running worker."""
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
    text = (await run_cli("infer", "--model", "efficientnet-lite0", "--image", str(CHELSEA), settings=settings)).output
    first = next(line for line in text.splitlines() if line.strip("│ ").startswith("1 "))
    assert "cat" in first, text
    assert sum(1 for line in text.splitlines() if line.strip("│ ")[:2] in {"1 ", "2 ", "3 ", "4 ", "5 "}) == 5


@pytest.mark.parametrize("args", [
    ["--model", "efficientnet-lite0", "--image", "/nonexistent/cat.png"],
    ["--model", "efficientnet-lite0", "--image", "README.md"],
    ["--model", "tiny", "--input", "x=/nonexistent/x.npy"],
    ["--model", "tiny", "--input", "x=README.md"],
])
async def test_cli_infer_refuses_unreadable_inputs_in_one_line(settings, args):
    text = (await run_cli("infer", *args, settings=settings, timeout=60, expect=2)).output  # a user error
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1 and text.startswith("error:"), text
