"""streams.serving.images and the ImageNet label file: no models built, numpy and Pillow only."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streams.serving.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_to_tensor,
    load_image,
    load_labels,
    load_model_info,
    probabilities,
    top_k,
)

LABELS_PATH = Path(__file__).parents[2] / "models" / "imagenet_labels.txt"
PREPROCESSING = {"kind": "image", "resize": 256, "crop": 224}


def solid_image(rgb, size=(320, 240)):
    return Image.new("RGB", size, rgb)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (224, 224), (1000, 300), (50, 40)])
def test_image_to_tensor_shape_and_dtype(size):
    tensor = image_to_tensor(solid_image((10, 20, 30), size), PREPROCESSING | {"normalize": "lite"})
    assert tensor.shape == (1, 3, 224, 224)
    assert tensor.dtype == np.float32
    assert tensor.flags["C_CONTIGUOUS"]


def test_imagenet_normalization_values():
    tensor = image_to_tensor(solid_image((255, 0, 128)), PREPROCESSING | {"normalize": "imagenet"})
    expected = (np.array([255, 0, 128], dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(tensor[0, :, 100, 100], expected, rtol=1e-5)
    np.testing.assert_allclose(tensor[0].reshape(3, -1).std(axis=1), 0, atol=1e-5)


def test_lite_normalization_values():
    tensor = image_to_tensor(solid_image((255, 0, 127)), PREPROCESSING | {"normalize": "lite"})
    np.testing.assert_allclose(tensor[0, :, 0, 0], [1.0, -127 / 128, 0.0], atol=1e-6)


def test_center_crop_and_channel_order():
    # 600x300, left half red, right half blue: resized to 512x256, the central 224 columns
    # straddle the boundary, red on the left; channel 0 is red (CHW, RGB order).
    image = Image.new("RGB", (600, 300), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 300, 300))
    tensor = image_to_tensor(image, PREPROCESSING | {"normalize": "lite"})
    assert tensor[0, :, 112, 0].tolist() == pytest.approx([1.0, -127 / 128, -127 / 128])
    assert tensor[0, :, 112, 223].tolist() == pytest.approx([-127 / 128, -127 / 128, 1.0])
    red = tensor[0, 0, 112] > 0
    assert red[:100].all() and not red[124:].any()


def test_load_image_from_bytes_and_path_gives_rgb(tmp_path):
    gray = Image.new("L", (30, 20), 200)
    path = tmp_path / "gray.png"
    gray.save(path)
    for source in (png_bytes(gray), path, str(path)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (30, 20)
        assert image.getpixel((0, 0)) == (200, 200, 200)


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1001.0, -1000.0]], dtype=np.float32)
    probs = probabilities(logits, "softmax")
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-6)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[1], [1 / (1 + np.e), np.e / (1 + np.e), 0.0], atol=1e-6)
    assert np.argmax(probs[0]) == 2


def test_probabilities_passthrough_and_unknown():
    output = np.array([[0.2, 0.8]], dtype=np.float32)
    np.testing.assert_array_equal(probabilities(output, None), output)
    with pytest.raises(ValueError):
        probabilities(output, "sigmoid")


def test_top_k_order():
    probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15], dtype=np.float32)
    labels = ["a", "b", "c", "d", "e"]
    result = top_k(probs, labels, k=3)
    assert [(i, label) for i, label, _ in result] == [(1, "b"), (3, "d"), (4, "e")]
    assert [p for _, _, p in result] == pytest.approx([0.4, 0.3, 0.15])
    assert top_k(probs, None, k=1) == [(1, "1", pytest.approx(0.4))]


def test_imagenet_labels_file():
    labels = LABELS_PATH.read_text().splitlines()
    assert len(labels) == 1000
    assert all(label.strip() == label and label for label in labels)
    assert all("cat" in label for label in labels[281:286])
    assert labels[285] == "Egyptian cat"
    assert labels[967] == "espresso"


def test_load_model_info_and_labels(tmp_path):
    info = {"name": "m", "labels": "labels.txt", "postprocessing": "softmax"}
    (tmp_path / "inferstream.json").write_text(json.dumps(info))
    (tmp_path / "labels.txt").write_text("zero\none\n")
    assert load_model_info(tmp_path) == info
    assert load_labels(tmp_path, info) == ["zero", "one"]
    assert load_labels(tmp_path, info | {"labels": None}) is None


def test_unreadable_images_are_one_clean_error(tmp_path):
    from streams.serving.images import ImageError

    cases = {b"not an image at all": "not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 32: "not an image",
             tmp_path / "missing.png": "no such file", tmp_path: "a directory", tmp_path / "text.png": "not an image"}
    (tmp_path / "text.png").write_text("hello")
    for source, expected in cases.items():
        with pytest.raises(ImageError) as caught:
            load_image(source)
        assert expected in str(caught.value) and "0x" not in str(caught.value), (source, caught.value)
