"""The Triton backend against real tritonservers (`TritonServer`: PyTriton in .venv-triton):
directly, then as a version's two backends in a worker, through a server outage and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from support.metrics import scrape, value
from support.waiting import wait_for

from infra.local.harness import wait_ready
from infra.local.stack import free_port
from infra.local.triton_server import TritonServer, triton_available
from streams.client import InferenceClient
from streams.registry.records import BackendSpec, ModelInfo, ModelRegistry, TensorSignature
from streams.registry.store import save_record
from streams.serving.backends.onnx import OnnxModel
from streams.serving.backends.triton import TritonModel, TritonUnavailable
from streams.settings import Settings
from topics.errors import ErrorCode, EventError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not triton_available(), reason="no .venv-triton: run infra/triton/setup.sh"),
]

SERVER_MAX_BATCH = 64  # infra/triton/serve.py's default cap on each model's max_batch_size
BREAKER_COOLDOWN_S = 2.0
FAST_FAILURE_S = 5.0  # an outage must be reported well before the request's 30 s deadline
CHECKS = Settings(_env_file=None, triton_hosts=["127.0.0.1"], triton_timeout_s=10.0)  # a registration's checks


def load_info(repository: Path, name: str) -> ModelInfo:
    return ModelRegistry.load(repository, [name]).get(name, "1")


def requests_for(info: ModelInfo, rows: list[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One request per entry of `rows`, random inputs of the signature's shapes."""
    rng = np.random.default_rng(seed)
    return [{s.name: rng.standard_normal([n, *s.shape[1:]]).astype(s.dtype) for s in info.inputs}
            for n in rows]


def backend(server: TritonServer, protocol: str) -> BackendSpec:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return BackendSpec(kind="triton", url=url, protocol=protocol)


def assert_same_outputs(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for outputs, reference in zip(got, expected):
        assert not isinstance(outputs, BaseException), outputs
        assert outputs.keys() == reference.keys()
        for name in reference:
            np.testing.assert_allclose(outputs[name], reference[name], rtol=1e-6, atol=1e-6)


def stop_all(servers: list[TritonServer]) -> None:
    """In parallel: each takes 5-10 s to drain and exit."""
    with ThreadPoolExecutor(max(1, len(servers))) as pool:
        list(pool.map(TritonServer.stop, servers))


@pytest.fixture(scope="module")
def triton(model_repository: Path, tmp_path_factory) -> Iterator[TritonServer]:
    """One server for the direct tests: tiny and resnet18 (ready in ~15 s)."""
    server = TritonServer(model_repository, ["tiny", "resnet18"],
                          tmp_path_factory.mktemp("triton") / "triton.log").start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_triton(model_repository: Path, tmp_path: Path):
    """Start tritonservers serving tiny (on given ports, if any); all stopped at the end."""
    servers: list[TritonServer] = []

    def start(**ports: int) -> TritonServer:
        log_path = tmp_path / f"triton-{len(servers)}.log"
        server = TritonServer(model_repository, ["tiny"], log_path, **ports)
        servers.append(server)
        return server.start()

    yield start
    stop_all(servers)


@contextlib.asynccontextmanager
async def started(info: ModelInfo, spec: BackendSpec, timeout_s: float = 10.0):
    model = TritonModel(info, spec, timeout_s=timeout_s)
    await model.start()
    try:
        yield model
    finally:
        await model.close()


# -- TritonModel directly ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("name", "rows"), [("tiny", [1, 3, 2, 5]), ("resnet18", [1, 2, 1])])
async def test_run_batch_equals_onnxruntime(triton, model_repository, protocol, name, rows):
    info = load_info(model_repository, name)
    batch = requests_for(info, rows, seed=len(rows))
    async with started(info, backend(triton, protocol)) as model:
        got = await model.run_batch(batch)
    assert_same_outputs(got, OnnxModel(info).run_batch(batch))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_groups_follow_shapes_and_the_servers_batch_limit(triton, model_repository, protocol):
    info = load_info(model_repository, "tiny")
    fitting = requests_for(info, [3] * 30)  # 90 rows: two groups under the server's 64
    odd_shape = {"x": np.ones((2, 15), np.float32)}  # its own group, refused by the server
    too_many_rows = requests_for(info, [SERVER_MAX_BATCH + 6], seed=1)[0]  # alone, refused
    async with started(info, backend(triton, protocol)) as model:
        assert model.max_rows == SERVER_MAX_BATCH  # the server's limit, under the signature's 1024
        got = await model.run_batch([*fitting, odd_shape, too_many_rows])
    assert_same_outputs(got[:30], OnnxModel(info).run_batch(fitting))
    for refused in got[30:]:
        assert isinstance(refused, EventError) and refused.code == ErrorCode.INFERENCE_FAILED, refused


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_the_check_accepts_the_served_signature(triton, model_repository, protocol):
    for name in ("tiny", "resnet18"):
        await TritonModel.check(load_info(model_repository, name), backend(triton, protocol), CHECKS)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("inputs", "error"), [
    ([TensorSignature(name="x", dtype="float64", shape=[-1, 16])],
     r"input 'x': datatype FP32 on the server, FP64 \(float64\) in the signature"),
    ([TensorSignature(name="features", dtype="float32", shape=[-1, 16])],
     r"input 'features' is missing on the server; the server has an undeclared input 'x'"),
    ([TensorSignature(name="x", dtype="float32", shape=[-1, 8])],
     r"input 'x': shape \[-1, 16\] on the server, \[-1, 8\] in the signature"),
])
async def test_the_check_names_the_difference(triton, model_repository, protocol, inputs, error):
    wrong = load_info(model_repository, "tiny").model_copy(update={"inputs": inputs})
    with pytest.raises(ValueError, match=error):
        await TritonModel.check(wrong, backend(triton, protocol), CHECKS)


# -- a version on two Triton servers, through the pipeline -------------------------------------


async def infer_many(client: InferenceClient, inputs: list[dict[str, np.ndarray]]) -> list:
    return await asyncio.gather(*(client.infer("tiny", x, version="7", timeout=30) for x in inputs))


def assert_served(results: list, inputs: list, expected_backends: set[str], onnx: OnnxModel) -> None:
    for result in results:
        assert result.header.status == "ok", result.header.error
    assert {r.header.backend for r in results} == expected_backends
    assert_same_outputs([r.tensors for r in results], onnx.run_batch(inputs))


async def first_success(client: InferenceClient, x: dict, timeout: float):
    """The first OK result for version 7, asking every half second (the breaker's probe needs
    its cooldown to pass)."""
    return await wait_for(lambda: client.infer("tiny", x, version="7", timeout=10), timeout=timeout, interval=0.5,
                          until=lambda result: result.header.status == "ok", what="version 7 recovering")


async def test_a_version_fails_over_between_triton_servers_and_recovers(
    start_triton, start_worker, settings, model_repository,
):
    a, b = start_triton(), start_triton()
    await asyncio.gather(asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready))
    tiny = load_info(model_repository, "tiny")
    spec_a, spec_b = backend(a, "grpc"), backend(b, "grpc")
    # Weight 0: unversioned requests stay on version 1; these tests ask for version 7 by name.
    await save_record(settings, tiny.model_copy(update={"version": "7", "weight": 0,
                                                     "backends": [spec_a, spec_b]}))
    onnx = OnnxModel(tiny)
    metrics_port = free_port()
    worker = start_worker(breaker_failures=2, breaker_cooldown_s=BREAKER_COOLDOWN_S, models=["tiny"],
                          metrics_port=metrics_port)
    inputs = requests_for(tiny, [1, 2, 3, 4] * 6, seed=3)

    async with (
        InferenceClient(settings) as client,
        started(tiny, spec_a) as direct_grpc,
        started(tiny, backend(a, "http")) as direct_http,
    ):
        await wait_ready(client, worker)  # version 1, in the worker's onnxruntime
        # Both servers up: concurrent requests spread over both (least outstanding).
        assert_served(await infer_many(client, inputs), inputs, {spec_a.label, spec_b.label}, onnx)

        # A stops: a direct call fails out of run_batch; the worker retries on B, then A's
        # breaker keeps requests off it.
        await asyncio.to_thread(a.stop)
        with pytest.raises(TritonUnavailable, match=r"StatusCode\.UNAVAILABLE"):
            await direct_grpc.run_batch(inputs[:2])
        with pytest.raises(TritonUnavailable, match="ClientConnectorError"):
            await direct_http.run_batch(inputs[:2])
        for _ in range(2):
            assert_served(await infer_many(client, inputs), inputs, {spec_b.label}, onnx)
        # A half-open once its cooldown is over: its failed probe is retried on B.
        await wait_for(lambda: scrape(f"http://127.0.0.1:{metrics_port}/metrics"), timeout=BREAKER_COOLDOWN_S + 10,
                       interval=0.1, what=f"{spec_a.label}'s breaker half-open",
                       until=lambda samples: value(samples, "inferstream_breaker_state", model="tiny", version="7",
                                                   backend=spec_a.label) == 1)
        assert_served(await infer_many(client, inputs), inputs, {spec_b.label}, onnx)

        # B stops too: every breaker opens, requests fail fast instead of waiting for their deadline.
        await asyncio.to_thread(b.stop)
        messages = []
        for x in inputs[:6]:
            t0 = time.monotonic()
            result = await client.infer("tiny", x, version="7", timeout=30)
            elapsed = time.monotonic() - t0
            assert result.header.status == "error" and result.header.error.code == ErrorCode.UNAVAILABLE
            assert elapsed < FAST_FAILURE_S, f"took {elapsed:.1f} s to fail"
            messages.append(result.header.error.message)
        # Once both breakers are open, requests are refused without trying either server.
        both_open = f"({spec_a.label}: open, {spec_b.label}: open)"
        assert any(both_open in message for message in messages), messages

        # A new server on B's ports: after the cooldown a probe finds it, and B serves again.
        revived = start_triton(http_port=b.http_port, grpc_port=b.grpc_port, metrics_port=b.metrics_port)
        await asyncio.to_thread(revived.wait_ready)
        await first_success(client, inputs[0], timeout=30)
        assert_served(await infer_many(client, inputs), inputs, {spec_b.label}, onnx)
