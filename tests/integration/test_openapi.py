"""/openapi.json describes every route as served, validates, and the bridge survives fuzzing
generated from it: no 5xx, and no status the document does not list."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest
from openapi_spec_validator import validate

from infra.local.harness import wait_ready
from streams.bridge.app import ROUTES
from streams.bridge.oip import unsupported
from streams.client import InferenceClient

pytestmark = pytest.mark.integration
FUZZ_EXAMPLES = 12  # per operation and phase: bounded, about three minutes on a 2-core box


async def test_the_document_validates_and_describes_every_route(start_bridge):
    bridge = await start_bridge()
    async with aiohttp.ClientSession() as session, session.get(f"{bridge.url}/openapi.json") as r:
        assert r.status == 200
        document = await r.json()
    validate(document)
    operations = [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]
    assert len(operations) == len(ROUTES)
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids))
    jobs, batches = document["paths"]["/v1/jobs"]["post"], document["paths"]["/v1/batches"]["post"]
    assert "202" in jobs["responses"] and "200" not in jobs["responses"] and "202" in batches["responses"]
    takes_body = {(r.path, r.method.lower()) for r in ROUTES if r.method in ("POST", "PATCH")
                  and r.handler is not unsupported}
    for path, method, op in operations:  # every body a POST/PATCH takes is described
        assert ("requestBody" in op) == ((path, method) in takes_body), (method, path)
    infer = document["paths"]["/v2/models/{model}/infer"]["post"]
    assert {"X-Inferstream-Timeout", "Inference-Header-Content-Length", "Authorization"} <= \
        {p["name"] for p in infer["parameters"]}
    classify = document["paths"]["/v1/models/{model}/classify"]["post"]
    assert "top_k" in {p["name"] for p in classify["parameters"]}


async def test_aiohttp_refusals_speak_the_same_vocabulary(start_bridge):
    bridge = await start_bridge()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{bridge.url}/no/such/route") as r:
            assert (r.status, (await r.json())["code"]) == (404, "NOT_FOUND")
        async with session.put(f"{bridge.url}/v1/jobs") as r:
            assert (r.status, (await r.json())["code"]) == (405, "METHOD_NOT_ALLOWED")


async def test_fuzzing_from_the_document_finds_no_server_error(start_worker, start_bridge, settings, tmp_path):
    worker = start_worker()
    bridge = await start_bridge()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
    # Until the worker's heartbeat says it serves the example model: before, 503 is the right answer.
    await bridge.wait_ready(60, path="/v2/models/tiny/ready")
    har = tmp_path / "fuzz.har"
    st = Path(sys.executable).with_name("st")
    proc = await asyncio.create_subprocess_exec(
        str(st), "run", f"{bridge.url}/openapi.json",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
        "--phases", "examples,coverage,fuzzing", "--max-examples", str(FUZZ_EXAMPLES), "--seed", "20261202",
        # One worker: concurrent compile() in CPython 3.11 can fail ("AST constructor recursion depth").
        "--workers", "1", "--request-timeout", "30", "--generation-database", "none", "--no-color",
        # A deadline the worker can meet: a tiny one is a correct 504, not a finding.
        "-H", "X-Inferstream-Timeout: 30",
        "--report", "har", "--report-har-path", str(har),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,  # its state stays there
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 900)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = [e["response"]["status"] for e in entries]
    server_errors = [(e["request"]["method"], e["request"]["url"], e["response"]["status"])
                     for e in entries if e["response"]["status"] >= 500]
    print(f"fuzzed: {len(entries)} requests, {len(server_errors)} with 5xx, statuses {sorted(set(statuses))}")
    assert len(entries) > 10 * len(ROUTES), output.decode()[-3000:]
    assert server_errors == [], server_errors[:20]
    assert proc.returncode == 0, output.decode()[-6000:]
    worker.check_running()
