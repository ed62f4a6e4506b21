from pathlib import Path

import numpy as np
import pytest

from streams.registry.records import ModelInfo, ModelRegistry, TensorSignature
from streams.registry.routing import Router, check_inputs
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest, TensorSpec
from topics.names import Topics


def info(name: str, version: str, **fields) -> ModelInfo:
    return ModelInfo(
        name=name, version=version, max_batch_size=8, **fields,
        inputs=[TensorSignature(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSignature(name="y", dtype="float32", shape=[-1, 4])],
        path=Path(f"/repo/{name}/{version}/model.onnx"),
    )


@pytest.fixture
def router() -> Router:
    registry = ModelRegistry([info("tiny", "1"), info("tiny", "2"), info("tiny", "10"), info("other", "3")])
    return Router(registry, Topics("t"))


def req(**kw) -> InferenceRequest:
    base = {"request_id": "r", "model": "tiny", "inputs": [TensorSpec(name="x", dtype="float32", shape=[1, 4])]}
    return InferenceRequest(**{**base, **kw})


def code(fn) -> ErrorCode:
    with pytest.raises(EventError) as e:
        fn()
    return e.value.code


def test_routes_to_the_models_topic_and_newest_version(router):
    route = router.route(req(), now_ms=0)
    assert route.topic == "t.model.tiny"
    assert route.model.version == "10"  # numeric order, not string order


def test_a_named_version_is_honoured(router):
    assert router.route(req(version="2"), now_ms=0).model.version == "2"


def test_unknown_model_and_version(router):
    assert code(lambda: router.route(req(model="nope"), 0)) == ErrorCode.UNKNOWN_MODEL
    assert code(lambda: router.route(req(version="7"), 0)) == ErrorCode.UNKNOWN_VERSION


def test_expired_deadline(router):
    assert code(lambda: router.route(req(deadline_ms=1000), now_ms=1001)) == ErrorCode.DEADLINE_EXCEEDED
    assert router.route(req(deadline_ms=1000), now_ms=1000).topic == "t.model.tiny"


def test_invalid_reply_topic_and_empty_inputs(router):
    assert code(lambda: router.route(req(reply_to="bad topic!"), 0)) == ErrorCode.INVALID_SCHEMA
    assert code(lambda: router.route(req(inputs=[]), 0)) == ErrorCode.INVALID_TENSOR
    assert router.route(req(inputs=[], inputs_ref="s3://b/k"), 0).topic == "t.model.tiny"


def test_check_inputs_accepts_the_signature():
    assert check_inputs(info("tiny", "1"), {"x": np.zeros((3, 4), np.float32)}) == 3


@pytest.mark.parametrize("tensors", [
    {"x": np.zeros((1, 5), np.float32)},  # wrong feature dim
    {"x": np.zeros((1, 4), np.float64)},  # wrong dtype
    {"x": np.zeros((4,), np.float32)},  # wrong rank
    {"z": np.zeros((1, 4), np.float32)},  # wrong name
    {"x": np.zeros((1, 4), np.float32), "z": np.zeros((1, 4), np.float32)},  # extra
    {"x": np.zeros((9, 4), np.float32)},  # over max_batch_size
    {"x": np.zeros((0, 4), np.float32)},  # empty batch
])
def test_check_inputs_rejects(tensors):
    assert code(lambda: check_inputs(info("tiny", "1"), tensors)) == ErrorCode.INVALID_TENSOR


def test_registry_loads_the_repository_layout(tmp_path):
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(b"")
    (model_dir / "inferstream.json").write_text(info("m", "1").model_dump_json(exclude={"path", "name", "version"}))
    registry = ModelRegistry.load(tmp_path)
    assert registry.names == ["m"] and registry.versions("m") == ["1"]
    with pytest.raises(FileNotFoundError):
        ModelRegistry.load(tmp_path, only=["absent"])


def test_weights_split_unversioned_requests_and_stick_per_key():
    registry = ModelRegistry([info("m", "1", weight=90), info("m", "2", weight=10)])
    chosen = [registry.resolve("m", key=f"request-{i}").version for i in range(2000)]
    assert 0.07 <= chosen.count("2") / 2000 <= 0.13
    assert all(registry.resolve("m", key=f"request-{i}").version == chosen[i] for i in range(100))
    assert registry.resolve("m").version == "2"  # no key: the newest active version


def test_draft_retired_and_shadow_versions():
    registry = ModelRegistry([
        info("m", "1"), info("m", "2", status="draft"), info("m", "3", status="retired"),
        info("m", "4", shadow=True),
    ])
    assert {registry.resolve("m", key=str(i)).version for i in range(200)} == {"1"}
    assert registry.resolve("m", "2").version == "2"  # a draft answers when named
    with pytest.raises(EventError) as e:
        registry.resolve("m", "3")
    assert e.value.code == ErrorCode.UNKNOWN_VERSION
    assert [s.version for s in registry.shadows("m")] == ["4"]
    assert registry.versions("m") == ["1", "2", "4"]


def test_a_stale_record_never_overwrites_a_newer_one():
    registry = ModelRegistry([info("m", "1", weight=5, revision=3)])
    assert not registry.apply(info("m", "1", weight=50, revision=2))
    assert registry.get("m", "1").weight == 5
    assert registry.apply(info("m", "1", weight=70, revision=4))
    assert registry.get("m", "1").weight == 70
