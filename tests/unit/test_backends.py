"""The backend table (every kind a version record may name has its module and class), the checks
a registration runs on each backend, and the processes that only read records importing no
backend library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import onnx
import pytest
from onnx import TensorProto, helper

from streams.registry.records import BackendSpec, ModelInfo, TensorSignature
from streams.serving.backends import BACKENDS, BackendKind, backend_class
from streams.serving.backends.onnx import OnnxModel
from streams.serving.backends.triton import TritonModel
from streams.settings import Settings

SETTINGS = Settings(_env_file=None, triton_hosts=["127.0.0.1"])


def test_every_kind_has_its_backend_class():
    assert set(get_args(BackendKind)) == set(BACKENDS)
    assert {kind: backend_class(kind) for kind in BACKENDS} == {"onnxruntime": OnnxModel, "triton": TritonModel}


def test_reading_records_imports_no_backend_library():
    code = ("import sys, streams.registry.store, streams.registry.routing, streams.serving.version_server; "
            "print(sorted({'onnxruntime', 'tritonclient'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_labels_name_the_kind_and_where_it_runs():
    assert BackendSpec().label == "onnxruntime"
    assert BackendSpec(kind="triton", url="127.0.0.1:8001", protocol="http").label == "triton-http://127.0.0.1:8001"


def scale_model(tmp_path: Path) -> ModelInfo:
    """y = 2x on [N, 4] float32."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "scale" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return ModelInfo(name="scale", version="1", max_batch_size=8, path=path,
                     inputs=[TensorSignature(name="x", dtype="float32", shape=[-1, 4])],
                     outputs=[TensorSignature(name="y", dtype="float32", shape=[-1, 4])])


async def test_the_onnxruntime_check_accepts_the_artifacts_signature(tmp_path):
    await OnnxModel.check(scale_model(tmp_path), BackendSpec(), SETTINGS)


@pytest.mark.parametrize(("change", "reason"), [
    ({"inputs": [TensorSignature(name="x", dtype="float64", shape=[-1, 4])]},
     r"input 'x': the artifact has float32\[-1, 4\], the signature says float64\[-1, 4\]"),
    ({"inputs": [TensorSignature(name="x", dtype="float32", shape=[-1, 5])]},
     r"input 'x': the artifact has float32\[-1, 4\], the signature says float32\[-1, 5\]"),
    ({"outputs": [TensorSignature(name="z", dtype="float32", shape=[-1, 4])]},
     r"outputs \['y'\] of the artifact differ from the signature \['z'\]"),
])
async def test_the_onnxruntime_check_names_the_difference(tmp_path, change, reason):
    with pytest.raises(ValueError, match=reason):
        await OnnxModel.check(scale_model(tmp_path).model_copy(update=change), BackendSpec(), SETTINGS)


async def test_an_artifact_that_is_no_model_is_refused_without_saying_why(tmp_path):
    info = scale_model(tmp_path)
    info.path.write_bytes(b"not a model")
    for path in (info.path, tmp_path / "missing.onnx"):
        with pytest.raises(ValueError) as refused:
            await OnnxModel.check(info.model_copy(update={"path": path}), BackendSpec(), SETTINGS)
        assert str(refused.value) == "scale/1: the artifact does not load as an ONNX model"


@pytest.mark.parametrize("url", ["10.0.0.7:8001", "localhost:8001", None])
async def test_the_triton_check_refuses_hosts_the_settings_do_not_name(tmp_path, url):
    with pytest.raises(ValueError, match="is not host:port on a host of INFERSTREAM_TRITON_HOSTS"):
        await TritonModel.check(scale_model(tmp_path), BackendSpec(kind="triton", url=url), SETTINGS)
