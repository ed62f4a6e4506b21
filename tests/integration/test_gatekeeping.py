"""Auth, rate limits, the registry and routing, end to end on the real stack."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import jwt
import pytest
from support.batch_files import put_jsonl
from support.bridge import oip_inputs, poll_json
from support.gate import AUTH, SECRET, Stores, call, ready_with, token
from support.presence import wait_until_served
from support.waiting import wait_for

from infra.local.harness import tiny_input, wait_ready
from streams.client import InferenceClient
from streams.registry.store import info_from_artifact
from streams.storage.objects import ObjectStore
from topics.events import Credentials

pytestmark = pytest.mark.integration


async def call_many(client: InferenceClient, count: int, credentials: Credentials | None = None):
    """Send `count` requests one after another, then wait for all replies."""
    pending = []
    for i in range(count):
        request = client.request("tiny", timeout=60, credentials=credentials)
        pending.append((request, await client.send(request, tiny_input(seed=i))))
    return await asyncio.gather(*(client.wait(r, w) for r, w in pending))


async def test_jwt_and_api_keys_accepted_bad_credentials_rejected(start_worker, settings):
    worker = start_worker(**AUTH)
    async with Stores(worker.settings) as stores, InferenceClient(settings) as client:
        key = await stores.keys.create("acme", ["infer"], name="ci")
        revoked = await stores.keys.create("acme", ["infer"], name="old")
        await ready_with(client, worker, Credentials(authorization=f"Bearer {token()}"))
        await stores.keys.revoke(revoked.split("_")[1])
        cases = {
            "valid jwt": (Credentials(authorization=f"Bearer {token()}"), None),
            "valid key": (Credentials(api_key=key), None),
            "expired": (Credentials(authorization=f"Bearer {token(exp=int(time.time()) - 10)}"), "UNAUTHENTICATED"),
            "audience": (Credentials(authorization=f"Bearer {token(aud='someone-else')}"), "UNAUTHENTICATED"),
            "signature": (Credentials(authorization=f"Bearer {token()[:-4]}AAAA"), "UNAUTHENTICATED"),
            "alg none": (Credentials(authorization="Bearer " + jwt.encode(
                {"tenant": "acme", "scope": "infer", "aud": "inferstream", "iss": "inferstream-tests"},
                None, algorithm="none")), "UNAUTHENTICATED"),
            "revoked key": (Credentials(api_key=revoked), "UNAUTHENTICATED"),
            "no credentials": (None, "UNAUTHENTICATED"),
            "no scope": (Credentials(authorization=f"Bearer {token(scope='read')}"), "FORBIDDEN"),
        }
        results = {name: await call(client, creds) for name, (creds, _) in cases.items()}
    for name, (_, code) in cases.items():
        header = results[name].header
        if code is None:
            assert header.status == "ok", (name, header.error)
            assert header.tenant == "acme", name
        else:
            assert header.error is not None and header.error.code == code, (name, header)
            assert "Bearer" not in header.error.message and SECRET not in header.error.message


async def test_100_of_150_requests_admitted_in_chunks_across_two_workers(start_worker, settings):
    first = start_worker(**AUTH)
    second = start_worker(**AUTH)
    async with Stores(first.settings) as stores, InferenceClient(settings) as client:
        key = await stores.keys.create("limited", ["infer"])
        warm = await stores.keys.create("warm-up", ["infer"])
        for worker in (first, second):
            await ready_with(client, worker, Credentials(api_key=warm))
        # One consumer group: the requests topic's partitions are split between the two workers,
        # so both intakes count these requests against the same Redis limit, each a chunk at once.
        results = await call_many(client, 150, Credentials(api_key=key))
        first.check_running()
        second.check_running()
    codes = Counter(r.header.error.code if r.header.error else "ok" for r in results)
    assert codes == {"ok": 100, "RATE_LIMITED": 50}, codes


async def test_canary_split_shadow_and_a_live_registry_change(start_worker, settings):
    worker = start_worker()
    async with Stores(worker.settings) as stores, InferenceClient(settings) as client:
        await wait_ready(client, worker)
        v1 = await stores.registry.get("tiny", "1")
        artifact = str(v1.path)
        cache = settings.state_dir / "artifacts"
        v2 = await asyncio.to_thread(info_from_artifact, "tiny", "2", artifact, stores.registry.store, cache,
                                     weight=10, max_batch_size=v1.max_batch_size)
        v3 = await asyncio.to_thread(info_from_artifact, "tiny", "3", artifact, stores.registry.store, cache,
                                     shadow=True, max_batch_size=v1.max_batch_size)
        await stores.registry.save(v1.model_copy(update={"weight": 90}))
        await stores.registry.save(v2)
        await stores.registry.save(v3)
        await wait_until_served(settings, "tiny/2", "tiny/3")  # the records come in order: v1's weight first

        results = await call_many(client, 2000)
        versions = Counter(r.header.model_version for r in results)
        assert all(r.header.status == "ok" for r in results), [r.header.error for r in results if r.header.error][:3]
        assert abs(versions["2"] / 2000 - 0.10) < 0.03, versions
        assert versions["3"] == 0 and client.foreign_replies == 0  # shadow results never come back

        shadow_rows = await wait_for(
            lambda: stores.pool.fetchval(
                "SELECT count(*) FROM inference_results WHERE shadow_of IS NOT NULL AND model_version = '3'"),
            timeout=60, interval=1.0, until=lambda n: n >= 2000, what="2000 shadow results stored")
        assert shadow_rows == 2000

        # A registry change reaches the running worker within seconds, without a restart.
        await stores.registry.save(v1.model_copy(update={"weight": 0}))

        async def versions_answering() -> set[str]:
            return {r.header.model_version for r in await call_many(client, 50)}

        await wait_for(versions_answering, timeout=20, interval=0.2, until=lambda versions: versions == {"2"},
                       what="requests answered by version 2 alone")


async def test_registration_is_validated(start_bridge, start_worker, settings, tmp_path):
    import aiohttp

    start_worker()
    bridge = await start_bridge()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    async with Stores(settings) as stores, aiohttp.ClientSession() as session:
        artifact = str((await stores.registry.get("tiny", "1")).path)
        resnet = str((await stores.registry.get("resnet18", "1")).path)
        cases = [
            ({"name": "tiny", "version": "9", "artifact": str(garbage)}, 400, "does not load"),
            ({"name": "tiny", "version": "9", "artifact": artifact,
              "inputs": [{"name": "x", "dtype": "int64", "shape": [-1, 16]}],
              "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 16]}]}, 400, "int64"),
            ({"name": "tiny", "version": "9", "artifact": resnet,
              "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 16]}],
              "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 16]}]}, 400, "differ"),
            ({"name": "tiny", "version": "9", "artifact": artifact, "status": "draft"}, 201, None),
        ]
        for body, status, reason in cases:
            async with session.post(f"{bridge.url}/v1/models", json=body) as r:
                answer = await r.json()
                assert r.status == status, answer
                if reason:
                    assert reason in answer["error"], answer
        async with session.patch(f"{bridge.url}/v1/models/tiny/versions/9", json={"weight": 5}) as r:
            assert r.status == 200 and (await r.json())["weight"] == 5
        async with session.get(f"{bridge.url}/v1/models") as r:
            listed = {(m["name"], m["version"], m["status"]) for m in await r.json()}
        assert ("tiny", "9", "draft") in listed
        async with session.delete(f"{bridge.url}/v1/models/tiny/versions/9") as r:
            assert (await r.json())["status"] == "retired"



async def test_registry_changes_through_the_bridge_need_the_admin_scope(start_bridge, settings):
    import aiohttp

    bridge = await start_bridge(**AUTH)
    async with Stores(settings) as stores, aiohttp.ClientSession() as session:
        artifact = str((await stores.registry.get("tiny", "1")).path)
        admin_key = await stores.keys.create("ops", ["admin"], "registry")
        infer_key = await stores.keys.create("acme", ["infer"], "caller")

        async def change(method: str, path: str, headers: dict[str, str], body: dict | None = None) -> tuple[int, dict]:
            async with session.request(method, f"{bridge.url}{path}", json=body, headers=headers) as r:
                return r.status, await r.json()

        register = {"name": "tiny", "version": "77", "artifact": artifact, "status": "draft"}
        refused = [
            ({}, 401), ({"Authorization": "Bearer not-a-token"}, 401), ({"X-API-Key": "isk_nope"}, 401),
            ({"Authorization": f"Bearer {token()}"}, 403), ({"X-API-Key": infer_key}, 403),
        ]
        for headers, status in refused:
            for method, path, body in [("POST", "/v1/models", register),
                                       ("PATCH", "/v1/models/tiny/versions/1", {"weight": 1000}),
                                       ("DELETE", "/v1/models/tiny/versions/1", None)]:
                answer = await change(method, path, headers, body)
                assert answer[0] == status, (method, headers, answer)
        assert (await stores.registry.get("tiny", "1")).status == "active"
        assert await stores.registry.get("tiny", "77") is None

        admin_token = {"Authorization": f"Bearer {token(scope='admin')}"}
        status, saved = await change("POST", "/v1/models", admin_token, register)
        assert status == 201 and saved["status"] == "draft", saved
        status, saved = await change("PATCH", "/v1/models/tiny/versions/77", {"X-API-Key": admin_key}, {"weight": 5})
        assert status == 200 and saved["weight"] == 5, saved
        status, saved = await change("DELETE", "/v1/models/tiny/versions/77", admin_token)
        assert status == 200 and saved["status"] == "retired", saved


async def test_triton_backends_only_on_allowed_hosts_and_remote_answers_never_echoed(start_bridge, settings):
    import aiohttp
    from aiohttp import web

    from infra.local.stack import free_port

    async def leak(request: web.Request) -> web.Response:
        return web.Response(status=400, text="SECRET-BODY-of-an-internal-service")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", leak)
    runner = web.AppRunner(app)
    await runner.setup()
    open_port, closed_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", open_port).start()
    bridge = await start_bridge()  # auth off, loopback: anonymous callers may change the registry
    try:
        async with aiohttp.ClientSession() as session:
            async def point_at(url: str, protocol: str = "http") -> tuple[int, str]:
                body = {"backends": [{"kind": "triton", "url": url, "protocol": protocol}]}
                async with session.patch(f"{bridge.url}/v1/models/tiny/versions/1", json=body) as r:
                    return r.status, (await r.json())["error"]

            for url in ["10.0.0.7:8001", "metadata.internal:80", f"127.0.0.1:{open_port}/v2?x=1",
                        f"user@127.0.0.1:{open_port}", "127.0.0.1"]:
                status, message = await point_at(url)
                assert status == 400 and "INFERSTREAM_TRITON_HOSTS" in message, (url, message)
            answered = await point_at(f"127.0.0.1:{open_port}")
            refused = await point_at(f"127.0.0.1:{closed_port}")
            assert answered[0] == refused[0] == 400
            assert "SECRET" not in answered[1], answered
            assert answered[1].replace(str(open_port), "PORT") == refused[1].replace(str(closed_port), "PORT")
            async with session.get(f"{bridge.url}/v1/models") as r:
                tiny = next(m for m in await r.json() if (m["name"], m["version"]) == ("tiny", "1"))
            assert all(b["kind"] == "onnxruntime" for b in tiny["backends"]), tiny
    finally:
        await runner.cleanup()


async def test_registrations_name_nothing_outside_the_pattern_and_reveal_no_files(start_bridge, settings, tmp_path):
    import aiohttp

    bridge = await start_bridge()
    async with Stores(settings) as stores, aiohttp.ClientSession() as session:
        artifact = (await stores.registry.get("tiny", "1")).path
        uploaded = await asyncio.to_thread(ObjectStore(settings).put, f"models/uploads/tiny-{tmp_path.name}.onnx",
                                           artifact.read_bytes())

        async def register(name, version, artifact: str) -> tuple[int, str]:
            body = {"name": name, "version": version, "artifact": artifact, "status": "draft"}
            async with session.post(f"{bridge.url}/v1/models", json=body) as r:
                return r.status, (await r.json())["error"]

        escapes = [("../../escaped", "1"), ("tiny", "../../../escaped"), (".hidden", "1"), ("tiny", "a/b"),
                   ("x" * 129, "1"), ({"a": 1}, "1")]
        for name, version in escapes:
            status, message = await register(name, version, uploaded)
            assert status == 400 and "input_value" not in message, (name, version, message)
        assert not list(settings.state_dir.parent.rglob("*escaped*"))

        # A file that exists but is no model, and one that does not exist: the same answer.
        existing = await register("probe", "1", "/etc/passwd")
        missing = await register("probe", "1", f"/nonexistent-{tmp_path.name}/model.onnx")
        missing_object = await register("probe", "1", f"s3://{settings.s3_bucket}/nothing-{tmp_path.name}.onnx")
        assert existing[0] == missing[0] == 400 and existing[1] == missing[1], (existing, missing)
        assert missing_object == existing, missing_object

        # S3 artifacts only from the artifact buckets (the product's by default), by a plain key.
        store = ObjectStore(settings)
        other = f"{settings.s3_bucket}-elsewhere"
        if not store.client.bucket_exists(other):
            store.client.make_bucket(other)
        elsewhere = f"s3://{other}/tiny.onnx"
        store.client.put_object(other, "tiny.onnx", __import__("io").BytesIO(artifact.read_bytes()),
                                artifact.stat().st_size)
        bucket, key = uploaded.removeprefix("s3://").split("/", 1)
        dotted = f"s3://{bucket}/models/../{key}"
        for uri in (elsewhere, dotted):
            status, message = await register("tiny", "31", uri)
            assert status == 403 and "artifact buckets" in message, (uri, status, message)
        body = {"name": "tiny", "version": "31", "artifact": uploaded, "status": "draft"}
        async with session.post(f"{bridge.url}/v1/models", json=body) as r:  # the product's bucket serves
            assert r.status == 201, await r.text()


async def test_jobs_and_batches_carry_credentials_and_are_readable_only_by_their_tenant(
        start_worker, start_bridge, settings):
    import aiohttp

    worker = start_worker(**AUTH)
    bridge = await start_bridge(**AUTH)
    acme = {"Authorization": f"Bearer {token(tenant='acme')}"}
    globex = {"Authorization": f"Bearer {token(tenant='globex')}"}
    admin = {"Authorization": f"Bearer {token(tenant='ops', scope='admin')}"}
    x = tiny_input(seed=3)["x"]
    job = {"model": "tiny", "inputs": oip_inputs(x)}
    async with InferenceClient(settings) as client, aiohttp.ClientSession() as session:
        await ready_with(client, worker, Credentials(authorization=acme["Authorization"]))

        async with session.post(f"{bridge.url}/v1/jobs", json=job) as r:
            assert r.status == 401, await r.text()
        async with session.post(f"{bridge.url}/v1/jobs", json={**job, "version": {"a": 1}}, headers=acme) as r:
            assert r.status == 400, await r.text()
        async with session.post(f"{bridge.url}/v1/jobs", json=job, headers=acme) as r:
            assert r.status == 202, await r.text()
            href = f"{bridge.url}{(await r.json())['href']}"

        # The worker authenticated the job with the caller's credentials, and ran it.
        answer = await poll_json(session, href, lambda job: job["status"] != "pending", timeout=60, headers=acme)
        assert answer["status"] == "completed", answer
        async with session.get(href, headers=admin) as r:
            assert r.status == 200 and (await r.json())["status"] == "completed"
        async with session.get(href, headers=globex) as r:
            stranger = (r.status, await r.json())
        async with session.get(f"{bridge.url}/v1/jobs/{'0' * 32}", headers=globex) as r:
            nobody = (r.status, await r.json())
        assert stranger[0] == nobody[0] == 404 and "completed" not in str(stranger[1])
        async with session.get(href) as r:
            assert r.status == 401

        uri = await asyncio.to_thread(put_jsonl, settings, f"inputs/batch-{uuid.uuid4().hex}.jsonl", [x])
        async with session.post(f"{bridge.url}/v1/batches", json={"model": "tiny", "input": uri}, headers=acme) as r:
            assert r.status == 202, await r.text()
            batch = f"{bridge.url}{(await r.json())['href']}"
        async with session.get(batch, headers=globex) as r:
            assert r.status == 404
        # The items were admitted as acme's requests, sealed by the worker that published them.
        progress = await poll_json(session, batch, lambda b: b["status"] in ("completed", "incomplete", "failed"),
                                   timeout=90, headers=acme)
        assert (progress["status"], progress["total"], progress["done"], progress["failed"]) == \
            ("completed", 1, 1, 0), progress
