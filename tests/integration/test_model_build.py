"""Build the models into temporary repositories and run them with onnxruntime (no network)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from support.tiny import tiny_reference  # noqa: E402

from models.build import MODELS, build_models, is_built  # noqa: E402
from streams.serving.images import (  # noqa: E402
    image_to_tensor,
    load_image,
    load_labels,
    load_model_info,
    probabilities,
    top_k,
)


def session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def skimage_file(name: str) -> Path:
    skimage_data = pytest.importorskip("skimage.data")
    return Path(skimage_data.__file__).parent / name


@pytest.fixture(scope="session")
def image_models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    names = ["resnet18", "efficientnet-lite0"]
    return dict(zip(names, build_models(tmp_path_factory.mktemp("repository"), names)))


def test_tiny_matches_numpy_formula(tmp_path):
    (model_dir,) = build_models(tmp_path, ["tiny"])
    assert model_dir == tmp_path / "tiny" and is_built(model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}-*")), "staging dir left behind"

    info = load_model_info(model_dir)
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 16]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": [-1, 16]}]
    assert info["max_batch_size"] == 1024 and info["labels"] is None
    assert onnx.load(model_dir / "1" / "model.onnx").ir_version <= 10

    x = np.random.default_rng(1).standard_normal((5, 16), dtype=np.float32)
    (y,) = session(model_dir).run(None, {"x": x})
    np.testing.assert_allclose(y, tiny_reference(x), rtol=1e-5, atol=1e-6)


def test_tiny_is_reused_unless_forced(tmp_path):
    (model_dir,) = build_models(tmp_path, ["tiny"])
    model_file = model_dir / "1" / "model.onnx"
    first_inode = model_file.stat().st_ino
    build_models(tmp_path, ["tiny"])
    assert model_file.stat().st_ino == first_inode
    build_models(tmp_path, ["tiny"], force=True)
    assert model_file.stat().st_ino != first_inode
    assert is_built(model_dir)


def test_a_model_whose_metadata_changed_is_rebuilt(tmp_path):
    (model_dir,) = build_models(tmp_path, ["tiny"])
    first_inode = (model_dir / "1" / "model.onnx").stat().st_ino
    metadata = model_dir / "inferstream.json"
    metadata.write_text(metadata.read_text().replace('"labels": null', '"labels": "old.txt"'))
    build_models(tmp_path, ["tiny"])
    assert (model_dir / "1" / "model.onnx").stat().st_ino != first_inode
    assert load_model_info(model_dir)["labels"] is None


def test_failed_build_leaves_previous_model_and_no_staging(tmp_path, monkeypatch):
    (model_dir,) = build_models(tmp_path, ["tiny"])
    before = (model_dir / "1" / "model.onnx").read_bytes()

    def broken_export(path):
        path.write_bytes(b"half a model")
        raise RuntimeError("export failed")

    monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(MODELS["tiny"], export=broken_export))
    with pytest.raises(RuntimeError, match="export failed"):
        build_models(tmp_path, ["tiny"], force=True)
    assert (model_dir / "1" / "model.onnx").read_bytes() == before
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}-*"))


def test_tiny_builds_without_torch(tmp_path):
    # None in sys.modules makes `import torch` fail, as in an install without the models extra.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from models.build import build_models\n"
        f"build_models(Path({str(tmp_path)!r}), ['tiny'])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    assert is_built(tmp_path / "tiny")


def test_unknown_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown models"):
        build_models(tmp_path, ["resnet50"])


@pytest.mark.parametrize("name", ["tiny", "resnet18", "efficientnet-lite0"])
def test_triton_config(name, tmp_path, request):
    if name == "tiny":
        (model_dir,) = build_models(tmp_path, ["tiny"])
    else:
        model_dir = request.getfixturevalue("image_models")[name]
    config = (model_dir / "config.pbtxt").read_text()
    info = load_model_info(model_dir)
    assert f'name: "{name}"' in config
    assert 'platform: "onnxruntime_onnx"' in config
    assert f"max_batch_size: {info['max_batch_size']}" in config
    for tensor in info["inputs"] + info["outputs"]:
        dims = ", ".join(str(d) for d in tensor["shape"][1:])
        assert f'name: "{tensor["name"]}"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]' in config
    assert "max_queue_delay_microseconds" in config and "KIND_CPU" in config


@pytest.mark.parametrize("name", ["resnet18", "efficientnet-lite0"])
def test_image_model_metadata(image_models, name):
    model_dir = image_models[name]
    info = load_model_info(model_dir)
    assert list(info) == [
        "name", "version", "backend", "max_batch_size", "inputs", "outputs",
        "labels", "preprocessing", "image_input", "postprocessing", "description",
    ]  # fmt: skip
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 3, 224, 224]}]
    # The image may also come as uint8 pixels or an image file (not graph inputs: the worker's)
    assert info["image_input"] == {"tensor": "input", "pixels": "pixels", "layout": "HWC", "encoded": "image"}
    assert info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [-1, 1000]}]
    assert info["postprocessing"] == "softmax"
    assert len(load_labels(model_dir, info)) == 1000
    model_inputs = session(model_dir).get_inputs()
    assert [(i.name, i.shape[1:]) for i in model_inputs] == [("input", [3, 224, 224])]
    assert isinstance(model_inputs[0].shape[0], str), "batch axis should be dynamic"
    assert json.loads((model_dir / "inferstream.json").read_text()) == info


def test_resnet18_dynamic_batch(image_models):
    model = session(image_models["resnet18"])
    images = np.random.default_rng(2).standard_normal((3, 3, 224, 224), dtype=np.float32)
    (one,) = model.run(None, {"input": images[:1]})
    (three,) = model.run(None, {"input": images})
    assert one.shape == (1, 1000) and three.shape == (3, 1000)
    assert np.isfinite(three).all()
    np.testing.assert_allclose(three[:1], one, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "image_file, expected", [("chelsea.png", range(281, 286)), ("coffee.png", [967])]
)
def test_efficientnet_lite0_recognizes_skimage_photos(image_models, image_file, expected):
    model_dir = image_models["efficientnet-lite0"]
    info = load_model_info(model_dir)
    tensor = image_to_tensor(load_image(skimage_file(image_file)), info["preprocessing"])
    (logits,) = session(model_dir).run(None, {"input": tensor})
    (probs,) = probabilities(logits, info["postprocessing"])
    best = top_k(probs, load_labels(model_dir, info), k=3)
    assert best[0][0] in expected, best
