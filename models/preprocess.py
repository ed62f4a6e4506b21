"""Turn images into model inputs and model outputs into top-k labels (numpy and Pillow only).

Each model's inferstream.json says which steps apply (see models/build.py).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

NORMALIZERS = {
    "imagenet": lambda x: (x - IMAGENET_MEAN) / IMAGENET_STD,
    # EfficientNet-Lite's native scaling of 0..255 pixels to about [-1, 1].
    "lite": lambda x: (x * 255.0 - 127.0) / 128.0,
}


class ImageError(ValueError):
    """An image that cannot be read; the message names no internals."""


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode an image file (path or encoded bytes) into an RGB image. Raises ImageError."""
    where = "" if isinstance(source, bytes) else f"{source}: "
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{where}no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{where}a directory, not an image") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{where}over {Image.MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, SyntaxError, ValueError):  # Pillow's ways of saying "not an image I read"
        raise ImageError(f"{where}not an image in a format this reads (PNG, JPEG, GIF, BMP, TIFF, WebP)") from None


def image_to_tensor(image: Image.Image, preprocessing: dict) -> np.ndarray:
    """Resize short side, center-crop, scale to [0, 1], normalize: float32 [1, 3, crop, crop]."""
    if preprocessing["kind"] != "image":
        raise ValueError(f"not an image preprocessing: {preprocessing}")
    resize, crop = preprocessing["resize"], preprocessing["crop"]
    image = image.convert("RGB")
    width, height = image.size
    # Long side truncated as torchvision's Resize(int) does, so inputs match the usual recipe.
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    normalized = NORMALIZERS[preprocessing["normalize"]](pixels)
    return np.ascontiguousarray(normalized.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)


def probabilities(output: np.ndarray, postprocessing: str | None) -> np.ndarray:
    """Class probabilities from a model output (softmax over the last axis, or as is)."""
    if postprocessing is None:
        return np.asarray(output, dtype=np.float32)
    if postprocessing != "softmax":
        raise ValueError(f"unknown postprocessing {postprocessing!r}")
    # Subtracting the row max keeps exp() from overflowing on large logits.
    shifted = np.exp(output - np.max(output, axis=-1, keepdims=True))
    return (shifted / np.sum(shifted, axis=-1, keepdims=True)).astype(np.float32)


def top_k(
    probs_row: np.ndarray, labels: list[str] | None, k: int = 5
) -> list[tuple[int, str, float]]:
    """(index, label, probability) of the k most likely classes, most likely first.

    Without labels (e.g. the tiny model) the label is the class index.
    """
    indices = np.argsort(-probs_row, kind="stable")[:k]
    return [
        (int(i), labels[i] if labels is not None else str(i), float(probs_row[i])) for i in indices
    ]


def load_model_info(model_dir: Path) -> dict:
    """The model's inferstream.json."""
    return json.loads((Path(model_dir) / "inferstream.json").read_text())


def load_labels(model_dir: Path, info: dict) -> list[str] | None:
    """Class names in index order, or None for a model without labels."""
    if info["labels"] is None:
        return None
    return (Path(model_dir) / info["labels"]).read_text().splitlines()
