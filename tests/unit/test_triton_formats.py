"""Triton compatibility without I/O: model config, statistics, repository index, refusals."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from infra.local import ROOT
from streams.registry.records import ModelRegistry
from streams.serving.oip import model_config, repository_index, unsupported_message
from streams.telemetry.model_stats import ModelStats, triton_stats
from streams.telemetry.presence import WorkerBeat, served

REPOSITORY = ROOT / "models" / "repository"


def built(name: str):
    if not (REPOSITORY / name / "config.pbtxt").exists():
        pytest.skip("models not built (python -m models.build)")
    return ModelRegistry.load(REPOSITORY, [name]).resolve(name)


@pytest.mark.parametrize("name", ["tiny", "resnet18", "efficientnet-lite0"])
def test_model_config_matches_the_models_config_pbtxt(name):
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    info = built(name)
    config = model_config(info, max_queue_delay_ms=5)
    parsed = text_format.Parse((REPOSITORY / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    # Our JSON form parses as Triton's ModelConfig message: every field name and enum is Triton's.
    ours = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    for field in ("name", "platform", "max_batch_size", "input", "output"):
        expected = [json_format.MessageToDict(t) for t in getattr(parsed, field)] if field in ("input", "output") \
            else getattr(parsed, field)
        got = [json_format.MessageToDict(t) for t in getattr(ours, field)] if field in ("input", "output") \
            else getattr(ours, field)
        if field in ("input", "output"):  # ours also states the defaults Triton leaves out
            got = [{k: v for k, v in t.items() if k in ("name", "dataType", "dims")} for t in got]
        if field == "input":  # an image model also takes its image as pixels or a file (below)
            got = [t for t in got if t["name"] in {s.name for s in info.inputs}]
        assert got == expected, field
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 5000
    assert parsed.HasField("dynamic_batching")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet-lite0"])
def test_an_image_models_config_offers_each_form_of_its_image_as_optional(name):
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    config = model_config(built(name), max_queue_delay_ms=5)
    json_format.ParseDict(config, model_config_pb2.ModelConfig())  # Triton's names: TYPE_STRING, FORMAT_NHWC
    inputs = {t["name"]: (t["data_type"], t["dims"], t["format"], t["optional"]) for t in config["input"]}
    assert inputs == {
        "input": ("TYPE_FP32", [3, 224, 224], "FORMAT_NONE", True),
        "pixels": ("TYPE_UINT8", [224, 224, 3], "FORMAT_NHWC", True),
        "image": ("TYPE_STRING", [1], "FORMAT_NONE", True),
    }


def test_model_config_keeps_the_batch_axis_of_a_model_that_does_not_batch():
    info = built("tiny").model_copy(update={"max_batch_size": 0})
    config = model_config(info, max_queue_delay_ms=5)
    assert config["input"][0]["dims"] == [-1, 16] and "dynamic_batching" not in config


def test_statistics_in_tritons_format():
    stats = ModelStats()
    stats.success("tiny", "1", rows=4, total_ms=10, compute_ms=2.5, now_ms=1_000)
    stats.success("tiny", "1", rows=1, total_ms=4, compute_ms=1, now_ms=900)
    stats.failure("tiny", "1", total_ms=3)
    stats.execution("tiny", "1", batch_size=2, compute_s=0.0025)
    fields = stats.pending()[("tiny", "1")]
    entry = triton_stats("tiny", "1", {**fields, "last_inference": 1_000})
    assert entry["inference_count"] == 5 and entry["execution_count"] == 1 and entry["last_inference"] == 1_000
    inference = entry["inference_stats"]
    assert inference["success"] == {"count": 2, "ns": 14_000_000}
    assert inference["fail"] == {"count": 1, "ns": 3_000_000}
    assert inference["queue"] == {"count": 2, "ns": 10_500_000}  # total less compute
    assert inference["compute_infer"] == {"count": 2, "ns": 3_500_000}
    assert inference["cache_hit"] == {"count": 0, "ns": 0}
    assert entry["batch_stats"] == [{"batch_size": 2, "compute_input": {"count": 0, "ns": 0},
                                     "compute_infer": {"count": 1, "ns": 2_500_000},
                                     "compute_output": {"count": 0, "ns": 0}}]
    assert triton_stats("tiny", "2", {})["inference_stats"]["success"] == {"count": 0, "ns": 0}


class _DeadRedis:
    def register_script(self, script):
        return None

    def pipeline(self, transaction=False):
        raise RedisConnectionError("Connection refused")


def test_statistics_are_kept_when_redis_is_down():
    stats = ModelStats()
    stats.success("tiny", "1", rows=1, total_ms=2, compute_ms=1, now_ms=5)
    assert asyncio.run(stats.flush(_DeadRedis(), "p")) is False
    stats.success("tiny", "1", rows=1, total_ms=2, compute_ms=1, now_ms=6)
    assert stats.pending()[("tiny", "1")]["success_count"] == 2
    assert stats.unavailable_count == 1


def test_repository_index_is_ready_where_a_live_worker_serves():
    info = built("tiny")
    infos = [info, info.model_copy(update={"version": "2"}),
             info.model_copy(update={"version": "3", "status": "retired"})]
    live = served([WorkerBeat(worker="w", group="g", host="h", pid=1, models=["tiny/1"])])
    assert repository_index(infos, live) == [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""},
        {"name": "tiny", "version": "2", "state": "UNAVAILABLE", "reason": "no live worker serves it"},
        {"name": "tiny", "version": "3", "state": "UNAVAILABLE", "reason": "retired"},
    ]
    assert [e["version"] for e in repository_index(infos, live, ready_only=True)] == ["1"]


@pytest.mark.parametrize("path, what", [
    ("/v2/repository/models/tiny/load", "model control"),
    ("/v2/logging", "log settings"),
    ("/v2/trace/setting", "trace settings"),
    ("/v2/models/tiny/trace/setting", "trace settings"),
    ("/v2/systemsharedmemory/region/r/register", "system shared memory"),
    ("/v2/cudasharedmemory/status", "CUDA shared memory"),
])
def test_unsupported_routes_say_what_and_why(path, what):
    message = unsupported_message(path)
    assert message.startswith(f"{what}") and "is not supported by inferstream: " in message


def test_an_unlisted_path_still_gets_a_message():
    assert unsupported_message("/v2/other").startswith("this Triton route is not supported by inferstream: ")


class _Server:
    def __init__(self, name: str, version: str, states: dict[str, str]) -> None:
        self.info = built("tiny").model_copy(update={"name": name, "version": version})
        self.balancer = self
        self._states = states

    def states(self) -> dict[str, str]:
        return self._states


def test_a_worker_serves_the_versions_it_loaded_whose_topic_it_holds_and_a_backend_is_not_cut_off():
    from streams.settings import Settings
    from streams.worker.pipeline import Pipeline

    pipeline = Pipeline(Settings(), ModelRegistry(), serve=["tiny", "other"])
    pipeline.inference.servers = {  # type: ignore[assignment]
        "tiny/1": _Server("tiny", "1", {"onnxruntime": "closed"}),
        "tiny/2": _Server("tiny", "2", {"triton-grpc://127.0.0.1:8001": "open"}),  # its only backend is down
        "tiny/3": _Server("tiny", "3", {"onnxruntime": "closed", "triton-grpc://127.0.0.1:8001": "open"}),
        "other/1": _Server("other", "1", {"onnxruntime": "half_open"}),
    }
    tiny, other = pipeline.topics.model("tiny"), pipeline.topics.model("other")
    assert pipeline.inference.served_versions({tiny, other}) == ["tiny/1", "tiny/3", "other/1"]
    assert pipeline.inference.served_versions({tiny}) == ["tiny/1", "tiny/3"]  # no partition of other's topic here
    assert pipeline.inference.served_versions(set()) == []
