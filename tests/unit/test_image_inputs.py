"""Image inputs without I/O (but a tiny ONNX file): uint8 pixels and encoded images, their checks
at the edges, the bytes tensor codec, and the worker's per-batch preprocessing."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from streams.registry.records import ImageInput, ModelInfo, TensorSignature
from streams.registry.routing import check_inputs
from streams.serving.backends.grouping import group_requests
from streams.serving.backends.onnx import OnnxModel
from streams.serving.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    crop_pixels,
    decode_rows,
    encoded_tensor,
    image_header,
    image_to_tensor,
    load_image,
    normalize_pixels,
)
from streams.storage.claims import request_digest
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest
from topics.tensors import pack, unpack

CROP = 8
PREPROCESSING = {"kind": "image", "resize": 10, "crop": CROP, "normalize": "imagenet"}
FORMS = {"tensor": "input", "pixels": "pixels", "layout": "HWC", "encoded": "image"}


def reference(pixels: np.ndarray, normalize: str) -> np.ndarray:
    """The textbook float32 recipe: scale to [0, 1], normalise, channels first."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD if normalize == "imagenet" else (x * 255.0 - 127.0) / 128.0
    return x.transpose(0, 3, 1, 2)


def photo(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and holds no pixels: what a bomb's header says."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IEND", b"")


def image_model(tmp_path: Path, **image_input) -> ModelInfo:
    """An image model whose output is its input's per-channel mean: [N, 3, 8, 8] -> [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[2, 3], keepdims=0)], "means",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, CROP, CROP])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 3])],
    )
    path = tmp_path / "means" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return ModelInfo(
        name="means", version="1", max_batch_size=16, path=path, preprocessing=PREPROCESSING,
        inputs=[TensorSignature(name="input", dtype="float32", shape=[-1, 3, CROP, CROP])],
        outputs=[TensorSignature(name="mean", dtype="float32", shape=[-1, 3])],
        image_input=ImageInput(**{**FORMS, **image_input}),
    )


# -- preprocessing -----------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["imagenet", "lite"])
def test_pixels_normalise_as_the_float32_recipe_does_in_either_layout(normalize):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    expected = reference(pixels, normalize)
    for layout, given in (("HWC", pixels), ("CHW", np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))):
        out = normalize_pixels(given, normalize, layout)
        assert out.dtype == np.float32 and out.shape == (5, 3, 7, 9) and out.flags.c_contiguous
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_extreme_pixels_map_where_the_recipe_maps_them():
    pixels = np.array([[[[0, 0, 0], [255, 255, 255]]]], dtype=np.uint8)
    np.testing.assert_allclose(normalize_pixels(pixels, "lite"), [[[[-127 / 128, 1.0]]] * 3], atol=1e-6)


def test_pixels_must_be_uint8_with_three_channels():
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(np.zeros((1, 4, 4, 3), np.float32), "imagenet")
    with pytest.raises(ValueError, match="3 channels"):
        normalize_pixels(np.zeros((1, 4, 4, 4), np.uint8), "imagenet")


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (10, 10), (300, 11), (8, 200)])
def test_cropping_resamples_the_crop_as_resizing_the_whole_image_then_cropping(size):
    image = photo(*size)
    width, height = size
    resized = image.resize((10, int(10 * height / width)) if width <= height else (int(10 * width / height), 10),
                           Image.Resampling.BILINEAR)
    left, top = (resized.width - CROP) // 2, (resized.height - CROP) // 2
    whole = np.asarray(resized.crop((left, top, left + CROP, top + CROP))).astype(int)
    got = crop_pixels(image, 10, CROP)
    assert got.dtype == np.uint8 and got.shape == (CROP, CROP, 3)
    assert np.abs(got.astype(int) - whole).max() <= 1  # rounding of the box's edges


def test_an_image_becomes_the_same_tensor_by_every_path():
    image = photo()
    tensor = image_to_tensor(image, PREPROCESSING)
    assert tensor.shape == (1, 3, CROP, CROP) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, reference(crop_pixels(image, 10, CROP)[np.newaxis], "imagenet"), atol=1e-5)
    decoded = decode_rows([encode(image)], PREPROCESSING)  # PNG: lossless
    np.testing.assert_allclose(normalize_pixels(decoded, "imagenet"), tensor, atol=1e-5)


def test_decoding_rows_gives_cropped_uint8_pixels_in_row_order():
    images = [photo(seed=s) for s in range(3)]
    rows = decode_rows([encode(images[0]), encode(images[1], "JPEG", quality=95), encode(images[2], "WEBP")],
                       PREPROCESSING)
    assert rows.dtype == np.uint8 and rows.shape == (3, CROP, CROP, 3)
    np.testing.assert_array_equal(rows[0], crop_pixels(images[0], 10, CROP))
    assert np.abs(rows[1].astype(int) - crop_pixels(images[1], 10, CROP)).mean() < 40  # lossy, same picture


def test_a_large_jpeg_decodes_at_a_reduced_scale_never_below_the_short_side():
    big = encode(Image.new("RGB", (1600, 1200), (200, 30, 30)), "JPEG")
    assert load_image(big).size == (1600, 1200)
    assert load_image(big, min_side=256).size == (400, 300)  # 1/4: 1/8 would give 200 < 256
    assert load_image(encode(photo(), "PNG"), min_side=4).size == (40, 30)  # only JPEGs scale


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + bytes(40),
                                  b"%PDF-1.4 not an image format read here"])
def test_bytes_that_are_no_image_fail_with_one_clean_message(data):
    with pytest.raises(ImageError, match="not an image") as caught:
        image_header(data)
    assert "0x" not in str(caught.value)


def test_a_truncated_image_passes_its_header_and_fails_in_decoding_naming_its_row():
    jpeg = encode(photo(), "JPEG")
    good, cut = encode(photo()), jpeg[:len(jpeg) // 2]
    assert image_header(cut) == ("JPEG", (40, 30))
    with pytest.raises(ImageError, match="row 1: the image data is truncated or corrupt"):
        decode_rows([good, cut], PREPROCESSING)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = png_header(6000, 5000)  # 30M pixels in 57 bytes
    assert len(bomb) < 100
    with pytest.raises(ImageError, match="6000x5000 is over the limit of 25,000,000 pixels"):
        image_header(bomb)
    with pytest.raises(ImageError, match="over the limit of 1,000 pixels"):
        load_image(encode(photo()), max_pixels=1000)
    with pytest.raises(ImageError, match="pixels"):  # past Pillow's own limit
        image_header(png_header(30000, 30000), max_pixels=10**12)
    assert image_header(png_header(6000, 5000), max_pixels=30_000_000) == ("PNG", (6000, 5000))


# -- the bytes tensor codec ----------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors_round_trip_in_events(binary):
    images = encoded_tensor([b"\x89PNG\0\xff", b"", b"jpeg"])
    assert images.shape == (3, 1) and images.dtype == object
    request = InferenceRequest(request_id="r", model="m")
    decoded = events.decode_request(events.encode_request(request, {"image": images}, binary=binary)).tensors
    assert decoded["image"].shape == (3, 1) and decoded["image"].tolist() == images.tolist()


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x09\0\0\0abcd", "element 0 runs past the end"),
    (b"\x01\0\0\0a\x01\0\0\0b\0", "1 bytes after its last element"),
    (b"\x01\0\0", "cannot hold 2 elements"),
])
def test_bad_bytes_tensors_are_refused(payload, message):
    spec = {"name": "image", "dtype": "bytes", "shape": [2, 1], "offset": 0, "nbytes": len(payload)}
    with pytest.raises(EventError, match=message) as caught:
        unpack([spec], payload)
    assert caught.value.code == ErrorCode.INVALID_TENSOR


def test_a_huge_claimed_shape_is_refused_before_anything_is_allocated():
    spec = {"name": "image", "dtype": "bytes", "shape": [10**12], "offset": 0, "nbytes": 8}
    with pytest.raises(EventError, match="cannot hold"):
        unpack([spec], bytes(8))


def test_a_bytes_tensor_holds_bytes_only():
    with pytest.raises(EventError, match="holds bytes, got str"):
        pack({"image": np.array(["a.png"], dtype=object)})


def test_equal_images_give_equal_request_digests():
    """A repeated request must digest alike (an object array's own buffer holds pointers)."""
    request = InferenceRequest(request_id="r", model="m")
    def digest(data: bytes) -> bytes:
        return request_digest(request, "t", {"image": encoded_tensor([data])})

    assert digest(b"same" * 100) == digest(bytes(bytearray(b"same" * 100))) != digest(b"other")


# -- the model's forms and their checks ---------------------------------------------------------


def test_an_image_model_takes_exactly_one_form_of_its_image(tmp_path):
    info = image_model(tmp_path)
    pixels = np.zeros((2, CROP, CROP, 3), np.uint8)
    assert check_inputs(info, {"pixels": pixels}) == 2
    assert check_inputs(info, {"input": np.zeros((1, 3, CROP, CROP), np.float32)}) == 1
    assert check_inputs(info, {"image": encoded_tensor([encode(photo())] * 3)}) == 3
    refused = {
        "none": {},
        "two": {"pixels": pixels, "image": encoded_tensor([encode(photo())] * 2)},
        "float pixels": {"pixels": pixels.astype(np.float32)},
        "CHW pixels for an HWC model": {"pixels": np.zeros((1, 3, CROP, CROP), np.uint8)},
        "a flat bytes tensor": {"image": encoded_tensor([encode(photo())]).reshape(1)},
        "too many rows": {"pixels": np.zeros((17, CROP, CROP, 3), np.uint8)},
    }
    for what, tensors in refused.items():
        with pytest.raises(EventError) as caught:
            check_inputs(info, tensors)
        assert caught.value.code == ErrorCode.INVALID_TENSOR, what
    with pytest.raises(EventError, match="takes its image as one of 'input'.*'pixels'.*'image'"):
        check_inputs(info, {})


def test_encoded_images_are_checked_at_the_edge_by_their_headers(tmp_path):
    info = image_model(tmp_path, max_bytes=1000, max_pixels=2000)
    cases = {
        "row 1: not an image": [encode(photo(10, 10)), b"junk"],
        "an image file is 1 to 1,000 bytes, got 3,": [encode(photo(), "PNG")],
        "over the limit of 2,000 pixels": [png_header(50, 50)],
    }
    for message, images in cases.items():
        with pytest.raises(EventError, match=message) as caught:
            check_inputs(info, {"image": encoded_tensor(images)})
        assert caught.value.code == ErrorCode.INVALID_IMAGE


def test_a_version_with_a_triton_backend_takes_the_float32_tensor_only(tmp_path):
    """A Triton server is given the graph's inputs: the worker prepares the other forms only for
    onnxruntime, so they are neither offered nor admitted where a Triton backend may serve."""
    from streams.registry.records import BackendSpec
    from streams.serving.oip import model_metadata

    info = image_model(tmp_path)
    mixed = info.model_copy(update={"backends": [BackendSpec(), BackendSpec(kind="triton", url="127.0.0.1:8001")]})
    assert info.image_forms is not None and mixed.image_forms is None
    assert [t["name"] for t in model_metadata(mixed, ["1"])["inputs"]] == ["input"]
    with pytest.raises(EventError, match="takes inputs \\['input'\\]"):
        check_inputs(mixed, {"pixels": np.zeros((1, CROP, CROP, 3), np.uint8)})
    (name, tensor), = mixed.image_file_inputs(encode(photo())).items()
    assert name == "input" and tensor.dtype == np.float32 and tensor.shape == (1, 3, CROP, CROP)
    (name, tensor), = info.image_file_inputs(encode(photo())).items()
    assert name == "image" and tensor.dtype == object


def test_an_image_input_must_fit_the_model(tmp_path):
    info = image_model(tmp_path)
    fields = info.model_dump()
    mask = {"name": "mask", "dtype": "float32", "shape": [-1]}
    bad = {
        "neither a pixels nor an encoded": {"image_input": {"tensor": "input"}},
        "must be a float32 graph input": {"image_input": {**FORMS, "tensor": "other"}},
        "must not be graph inputs": {"image_input": {**FORMS, "pixels": "mask"},
                                     "inputs": [*fields["inputs"], mask]},
        "names an input twice": {"image_input": {**FORMS, "pixels": "image"}},
        "needs preprocessing": {"preprocessing": None},
        "needs preprocessing {kind: image": {"preprocessing": {**PREPROCESSING, "normalize": "sepia"}},
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):
            ModelInfo.model_validate({**fields, **change})


# -- the worker's batch ------------------------------------------------------------------------


def test_a_batch_of_every_form_gets_the_float32_paths_answers_and_a_bad_image_fails_alone(tmp_path):
    info = image_model(tmp_path, layout="CHW")
    model = OnnxModel(info)
    images = [photo(seed=s) for s in range(4)]
    as_float = np.concatenate([image_to_tensor(image, PREPROCESSING) for image in images])
    expected = model.run({"input": as_float})["mean"]
    crops = np.stack([crop_pixels(image, 10, CROP) for image in images])
    batch = [
        {"image": encoded_tensor([encode(images[0]), encode(images[1])])},
        {"image": encoded_tensor([encode(images[0]), encode(images[1])[:60]])},  # truncated
        {"pixels": np.ascontiguousarray(crops[2:3].transpose(0, 3, 1, 2))},
        {"input": as_float[3:]},
        {"image": encoded_tensor([b"GIF89a-but-not-really"])},
        {"pixels": np.ascontiguousarray(crops[:2].transpose(0, 3, 1, 2))},
    ]
    results = model.run_batch(batch)
    assert [type(r).__name__ for r in results] == ["dict", "EventError", "dict", "dict", "EventError", "dict"]
    for failed in (results[1], results[4]):
        assert isinstance(failed, EventError) and failed.code == ErrorCode.INVALID_IMAGE
    assert "row 1" in results[1].message  # type: ignore[union-attr]
    np.testing.assert_allclose(results[0]["mean"], expected[:2], atol=1e-5)  # type: ignore[index]
    np.testing.assert_allclose(results[2]["mean"], expected[2:3], atol=1e-5)  # type: ignore[index]
    np.testing.assert_allclose(results[3]["mean"], expected[3:], atol=1e-6)  # type: ignore[index]
    np.testing.assert_allclose(results[5]["mean"], expected[:2], atol=1e-5)  # type: ignore[index]


def test_decoded_and_sent_pixels_share_a_session_call_float32_requests_do_not():
    pixels = {"input": np.zeros((1, CROP, CROP, 3), np.uint8)}
    floats = {"input": np.zeros((1, 3, CROP, CROP), np.float32)}
    assert group_requests([pixels, floats, pixels, floats], 16) == [[0, 2], [1, 3]]


def test_a_batch_runs_in_session_calls_of_at_most_max_rows_on_cpu(tmp_path, monkeypatch):
    model = OnnxModel(image_model(tmp_path), cpu_max_rows=4)
    assert model.max_rows == 4 and OnnxModel(model.info, cpu_max_rows=0).max_rows == 16  # 0: the model's max
    calls: list[int] = []
    run = model.run
    monkeypatch.setattr(model, "run", lambda inputs: calls.append(len(inputs["input"])) or run(inputs))
    pixels = np.random.default_rng(3).integers(0, 256, (3, CROP, CROP, 3), dtype=np.uint8)
    results = model.run_batch([{"pixels": pixels}] * 3 + [{"pixels": pixels[:1]}])
    assert calls == [3, 3, 4]  # a call takes whole requests: 3 + 3 > 4, 3 + 1 = 4
    np.testing.assert_allclose(results[0]["mean"], results[2]["mean"])  # type: ignore[index]
