"""The Triton model config that models/build.py writes: parsed with Triton's own ModelConfig
message (tritonclient ships it), without building any model."""

from __future__ import annotations

import ast
import inspect
import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import streams.serving.backends.triton as triton_backend
from models import build
from models.build import MODELS, build_models, preferred_batch_sizes, triton_config

KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


def _config(name: str, gpu: bool = False) -> model_config_pb2.ModelConfig:
    spec = MODELS[name]
    text = triton_config(build._metadata(spec), spec.queue_delay_us, gpu)
    return text_format.Parse(text, model_config_pb2.ModelConfig())  # raises on an unknown field


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_is_a_triton_model_config(name):
    spec, config = MODELS[name], _config(name)
    assert config.name == name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == spec.max_batch_size
    assert [i.name for i in config.input] == list(spec.inputs)
    assert [o.name for o in config.output] == list(spec.outputs)
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == spec.queue_delay_us
    assert list(batching.preferred_batch_size) == preferred_batch_sizes(spec.max_batch_size)


@pytest.mark.parametrize(("max_batch_size", "expected"), [
    (64, [8, 16, 32, 64]), (1024, [128, 256, 512, 1024]), (100, [8, 16, 32, 64]), (3, [1, 2]), (1, [1]),
])
def test_preferred_batch_sizes_are_the_largest_powers_of_two_that_fit(max_batch_size, expected):
    assert preferred_batch_sizes(max_batch_size) == expected


@pytest.mark.parametrize(("gpu", "kind"), [(False, KIND_CPU), (True, KIND_GPU)])
def test_instance_group_follows_the_gpu_flag(gpu, kind):
    (group,) = _config("resnet18", gpu).instance_group
    assert group.kind == kind and group.count == 1


def test_version_policy_serves_the_version_the_backend_addresses():
    """The backend names no model_version in any call, so Triton answers with its latest
    version: the policy keeps exactly that one loaded."""
    policy = _config("tiny").version_policy
    assert policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions == 1
    tree = ast.parse(inspect.getsource(triton_backend))
    keywords = {k.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for k in node.keywords}
    assert "infer" in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "model_version" not in keywords


def _fake_built_model(repository, name):
    """A model directory that build_models takes as built and current (no export needed)."""
    model_dir = repository / name
    (model_dir / build.VERSION).mkdir(parents=True)
    (model_dir / build.VERSION / "model.onnx").write_bytes(b"not exported in this test")
    (model_dir / build.METADATA_FILE).write_text(json.dumps(build._metadata(MODELS[name])))
    return model_dir


def test_a_built_model_gets_the_gpu_config_without_a_rebuild(tmp_path):
    model_dir = _fake_built_model(tmp_path, "tiny")
    model_file = model_dir / build.VERSION / "model.onnx"
    (config_path,) = [d / build.CONFIG_FILE for d in build_models(tmp_path, ["tiny"])]
    assert "kind: KIND_CPU" in config_path.read_text()
    build_models(tmp_path, ["tiny"], gpu=True)
    assert "kind: KIND_GPU" in config_path.read_text()
    assert model_file.read_bytes() == b"not exported in this test"  # reused, not rebuilt
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".")] == []


def test_main_passes_the_gpu_flag(tmp_path):
    _fake_built_model(tmp_path, "tiny")
    build.main(["--repository", str(tmp_path), "--only", "tiny", "--gpu"])
    assert "kind: KIND_GPU" in (tmp_path / "tiny" / build.CONFIG_FILE).read_text()
