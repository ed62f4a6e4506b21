"""Triton backend: runs one micro-batch on a Triton Inference Server through tritonclient's async
gRPC or HTTP client, grouped like the in-process backend (requests whose non-batch dims agree are
concatenated along the batch axis, one infer call per group, outputs split back).

Failures go two ways. The server unreachable, timing out or lacking the model raises
TritonUnavailable out of `run_batch`: every request of the batch fails, the balancer records a
backend failure and the requests are retried on another backend. The server refusing or failing
one group's inputs (INVALID_ARGUMENT, INTERNAL) fails only that group's requests, with
INFERENCE_FAILED.

A registration's check: the server is on a host the settings name (`INFERSTREAM_TRITON_HOSTS`),
answers, and serves a model of the version's signature.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as grpc_types
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as http_types
import tritonclient.http.aio as http_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from streams.registry.records import BackendSpec, ModelInfo, TensorSignature
from streams.serving.backends import Backend, Tensors
from streams.serving.backends.grouping import concat_rows, group_failed, group_requests, scatter, split_rows
from streams.settings import Settings
from topics.errors import EventError

log = logging.getLogger(__name__)

# Statuses (gRPC, HTTP) that blame the request or the model's run, not the server's health.
REQUEST_FAULTS = {"StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "400", "500"}
# gRPC's reconnect backoff grows to 120 s by default: a restarted server would stay unused long
# after its breaker's cooldown. Capped, the breaker alone paces the retries.
MAX_RECONNECT_BACKOFF_MS = 1000
GRPC_CHANNEL_ARGS = [
    # tritonclient's own limits (replaced, not extended, by channel_args): no message size cap.
    ("grpc.max_send_message_length", grpc_types.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpc_types.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]


class TritonUnavailable(ConnectionError):
    """A Triton server did not serve a call: down, timed out, or without the model."""


def _infer_args(types, tensors: Tensors, output_names: list[str]) -> tuple[list, list]:
    """tritonclient inputs and requested outputs, as binary tensors (`types`: its grpc or http
    module; binary is HTTP's default and gRPC's only form)."""
    inputs = []
    for name, array in tensors.items():
        tensor = types.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs, [types.InferRequestedOutput(name) for name in output_names]


class _GrpcClient:
    """tritonclient.grpc.aio; every call carries the deadline."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._client = grpc_aio.InferenceServerClient(url, channel_args=GRPC_CHANNEL_ARGS)
        self._deadline = {"client_timeout": timeout_s}

    async def metadata(self, model: str) -> dict:
        return await self._client.get_model_metadata(model, as_json=True, **self._deadline)

    async def max_batch_size(self, model: str) -> int:
        config = await self._client.get_model_config(model, as_json=True, **self._deadline)
        return int(config["config"].get("max_batch_size", 0))  # protobuf's JSON omits zeros

    async def infer(self, model: str, tensors: Tensors, output_names: list[str]):
        inputs, outputs = _infer_args(grpc_types, tensors, output_names)
        return await self._client.infer(model, inputs, outputs=outputs, **self._deadline)

    async def close(self) -> None:
        await self._client.close()


class _HttpClient:
    """tritonclient.http.aio; its session's total timeout (`conn_timeout`) bounds every call
    (`infer(timeout=)` is a server-side queue timeout instead)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._client = http_aio.InferenceServerClient(url, conn_timeout=timeout_s)

    async def metadata(self, model: str) -> dict:
        return await self._client.get_model_metadata(model)

    async def max_batch_size(self, model: str) -> int:
        return int((await self._client.get_model_config(model)).get("max_batch_size", 0))

    async def infer(self, model: str, tensors: Tensors, output_names: list[str]):
        inputs, outputs = _infer_args(http_types, tensors, output_names)
        return await self._client.infer(model, inputs, outputs=outputs)

    async def close(self) -> None:
        await self._client.close()


def triton_host_allowed(url: str | None, hosts: list[str]) -> bool:
    """Whether `url` is `host:port` with the host among `hosts`: the bridge and the workers
    connect where a registration points, so only to Triton servers the settings name."""
    if not url:
        return False
    try:
        parts = urlsplit(f"//{url}")
        port = parts.port
    except ValueError:
        return False
    return (port is not None and parts.hostname is not None and parts.hostname in hosts
            and f"//{url}" == f"//{parts.netloc}" and not parts.username and not parts.password)


def signature_differences(kind: str, declared: list[TensorSignature],
                          served: list[dict]) -> list[str]:
    """How the server's tensors (its metadata's `inputs` or `outputs`) differ from the declared
    ones: names, datatypes, shapes."""
    by_name = {tensor["name"]: tensor for tensor in served}
    names = {spec.name for spec in declared}
    differences = [f"{kind} {n!r} is missing on the server" for n in sorted(names - set(by_name))]
    differences += [f"the server has an undeclared {kind} {n!r}"
                    for n in sorted(set(by_name) - names)]
    for spec in declared:
        if spec.name in by_name:
            differences += _tensor_differences(f"{kind} {spec.name!r}", spec, by_name[spec.name])
    return differences


def _tensor_differences(what: str, spec: TensorSignature, tensor: dict) -> list[str]:
    differences = []
    datatype = np_to_triton_dtype(np.dtype(spec.dtype))
    if tensor["datatype"] != datatype:
        differences.append(f"{what}: datatype {tensor['datatype']} on the server,"
                           f" {datatype} ({spec.dtype}) in the signature")
    shape = [int(dim) for dim in tensor["shape"]]  # gRPC's JSON gives int64 dims as strings
    if not _shapes_agree(shape, spec.shape):
        differences.append(f"{what}: shape {shape} on the server, {spec.shape} in the signature")
    return differences


def _shapes_agree(served: list[int], declared: list[int]) -> bool:
    """Same rank, and equal sizes wherever neither side is dynamic (-1)."""
    return len(served) == len(declared) and all(
        a == b or -1 in (a, b) for a, b in zip(served, declared))


class TritonModel:
    """A version's backend on a Triton server: `spec.model_name` (default: the version's model
    name) at `spec.url`, whose latest version the server picks."""

    def __init__(self, info: ModelInfo, spec: BackendSpec, timeout_s: float) -> None:
        if spec.kind != "triton" or not spec.url:
            raise ValueError(f"{info.key}: not a Triton backend with a url: {spec}")
        self.info = info
        self.spec = spec
        self.url: str = spec.url
        self.timeout_s = timeout_s
        self.model_name = spec.model_name or info.name
        self.output_names = [output.name for output in info.outputs]
        self.max_rows = info.max_batch_size
        self._client: _GrpcClient | _HttpClient | None = None

    @classmethod
    async def check(cls, info: ModelInfo, spec: BackendSpec, settings: Settings) -> None:
        """The server must be one the settings name, and serve a model of the version's signature."""
        if not triton_host_allowed(spec.url, settings.triton_hosts):
            raise ValueError(f"{info.key}: Triton backend {spec.url!r} is not host:port on a host of"
                             " INFERSTREAM_TRITON_HOSTS")
        model = cls(info, spec, settings.triton_timeout_s)
        try:
            await model.start()
        except ValueError as exc:  # our comparison of the served model with the signature
            raise ValueError(f"{info.key}: Triton backend {spec.label}: {exc}") from None
        except Exception:  # noqa: BLE001 - never echo what a remote answered: refused, alike
            raise ValueError(f"{info.key}: Triton backend {spec.label} did not answer as a Triton"
                             " server serving this model") from None
        await model.close()

    @classmethod
    async def load(cls, info: ModelInfo, spec: BackendSpec, settings: Settings) -> TritonModel:
        model = cls(info, spec, settings.triton_timeout_s)
        try:
            await model.start()
        except Exception as exc:  # noqa: BLE001 - served by the other backends meanwhile
            log.warning("%s: %s not reachable yet (%r); it connects on its first call", info.key, spec.label, exc)
        return model

    @property
    def client(self) -> _GrpcClient | _HttpClient:
        if self._client is None:
            raise RuntimeError(f"{self.spec.label}: Triton backend of {self.info.key} not started")
        return self._client

    async def start(self) -> None:
        """Connect, check the served model against the signature, and learn its batch limit."""
        client_type = _GrpcClient if self.spec.protocol == "grpc" else _HttpClient
        self._client = client_type(self.url, self.timeout_s)
        try:
            await self.check_metadata()
            served_max = await self.client.max_batch_size(self.model_name)
        except BaseException:
            await self.close()
            raise
        # The server refuses (INVALID_ARGUMENT) a group over its own max_batch_size.
        self.max_rows = min(self.max_rows, served_max or self.max_rows)
        log.info("%s: %s as %r (groups of up to %d rows)", self.info.key, self.spec.label,
                 self.model_name, self.max_rows)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def check_metadata(self) -> None:
        """ValueError naming every difference between the served model and the signature."""
        metadata = await self.client.metadata(self.model_name)
        differences = (signature_differences("input", self.info.inputs, metadata["inputs"])
                       + signature_differences("output", self.info.outputs, metadata["outputs"]))
        if differences:
            raise ValueError(f"{self.spec.label}: model {self.model_name!r} does not match the"
                             f" signature of {self.info.key}: " + "; ".join(differences))

    async def run_batch(self, batch: list[Tensors]) -> list[Tensors | BaseException]:
        """One entry per request: its outputs, or the error that hit its group. Groups run
        concurrently (the server batches them as it sees fit)."""
        if self._client is None:  # not reachable at load time: connect now (or fail over)
            try:
                await self.start()
            except Exception as exc:
                raise TritonUnavailable(f"{self.spec.label}: cannot connect: {type(exc).__name__}: {exc}") from exc
        groups = group_requests(batch, self.max_rows)
        outcomes = await asyncio.gather(*(self._run_group([batch[i] for i in g]) for g in groups))
        return scatter(groups, outcomes)

    async def _run_group(self, members: list[Tensors]) -> list[Tensors] | list[EventError]:
        stacked = concat_rows(members)
        try:
            result = await self.client.infer(self.model_name, stacked, self.output_names)
        except Exception as exc:
            if isinstance(exc, InferenceServerException) and exc.status() in REQUEST_FAULTS:
                return group_failed(self.info.key, len(members), exc)
            # The server's trouble: the whole batch fails over. Named, as tritonclient's
            # exceptions have an empty repr and the worker logs reprs.
            raise TritonUnavailable(f"{self.spec.label}: {type(exc).__name__}: {exc}") from exc
        return split_rows({name: result.as_numpy(name) for name in self.output_names}, members)



# The class BACKENDS["triton"] stands for; typed, so that mypy checks it follows Backend.
BACKEND: type[Backend] = TritonModel
