"""Turn images into model inputs and model outputs into top-k labels (numpy and Pillow only).

Each model's inferstream.json says which steps apply (see models/build.py). An image becomes a
model input in two steps: pixels (decode, resize the short side, centre-crop: uint8 [crop, crop,
3]) and normalisation (uint8 [N, ...] to float32 [N, 3, crop, crop], one vectorised pass over a
whole batch). Callers that prepare float32 tensors themselves and the worker, which prepares
uint8 pixels and encoded images once per batch, share these functions.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from functools import cache
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


# The formats an image may come in (Pillow's names); no other decoder is tried.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
FORMATS_TEXT = "PNG, JPEG, GIF, BMP, TIFF, WebP"
# Width x height an image may have, read from its header before any pixel is decoded: a small
# file can decode to a huge image (a decompression bomb). Models may set their own
# (image_input.max_pixels); Pillow itself refuses over 2 x Image.MAX_IMAGE_PIXELS (179M).
MAX_PIXELS = 25_000_000
# Pillow warns from MAX_IMAGE_PIXELS (89M) on: our own, lower bound is checked right after.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An image that cannot be read; the message names no internals."""


def _open(source: str | Path | bytes, where: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS)
    except FileNotFoundError:
        raise ImageError(f"{where}no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{where}a directory, not an image") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{where}over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels") from None
    except (OSError, SyntaxError, ValueError):  # Pillow's ways of saying "not an image I read"
        raise ImageError(f"{where}not an image in a format this reads ({FORMATS_TEXT})") from None


def _check_size(image: Image.Image, max_pixels: int, where: str) -> None:
    if image.width * image.height > max_pixels:
        raise ImageError(f"{where}{image.width}x{image.height} is over the limit of {max_pixels:,} pixels")


def image_header(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) of encoded image bytes, read from the header alone; raises
    ImageError for bytes in no format read here or over `max_pixels`. Cheap (no pixel is
    decoded): the edges check images with it before they travel."""
    with _open(data, "") as image:
        _check_size(image, max_pixels, "")
        return str(image.format), image.size


def load_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode an image file (path or encoded bytes) into an RGB image. Raises ImageError.

    `min_side`: a JPEG much larger than needed may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
    DCT scaling, several times faster than decoding it whole), never below `min_side` on its
    short side."""
    where = "" if isinstance(source, bytes) else f"{source}: "
    with _open(source, where) as image:
        _check_size(image, max_pixels, where)
        try:
            if min_side:
                image.draft("RGB", (min_side, min_side))
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError):  # truncated or corrupt past the header
            raise ImageError(f"{where}the image data is truncated or corrupt") from None


def crop_pixels(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """Resize the short side to `resize`, centre-crop `crop` x `crop`: uint8 [crop, crop, 3].

    Only the cropped region is resampled (Pillow's `box`): the same filter positions and weights
    as resizing the whole image and cropping it, for about half the work."""
    image = image.convert("RGB")
    width, height = image.size
    # Long side truncated as torchvision's Resize(int) does, so inputs match the usual recipe.
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    sx, sy = width / size[0], height / size[1]
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return np.asarray(image.resize((crop, crop), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)


@cache
def _affine(normalize: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) with NORMALIZERS[normalize](p / 255) == p * scale + offset
    for pixel values p (every normaliser is affine per channel)."""
    zero = np.asarray(NORMALIZERS[normalize](np.zeros(3)), dtype=np.float64)
    one = np.asarray(NORMALIZERS[normalize](np.ones(3)), dtype=np.float64)
    return ((one - zero) / 255.0).astype(np.float32), zero.astype(np.float32)


def normalize_pixels(pixels: np.ndarray, normalize: str, layout: str = "HWC") -> np.ndarray:
    """uint8 pixels [N, H, W, 3] (HWC) or [N, 3, H, W] (CHW) as the model's float32 input
    [N, 3, H, W]: one multiply-add per channel over the whole batch."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"pixels must be uint8 [N, ...] with 4 dimensions, got {pixels.dtype} {pixels.shape}")
    planar = pixels.transpose(0, 3, 1, 2) if layout == "HWC" else pixels
    if planar.shape[1] != 3:
        raise ValueError(f"pixels in layout {layout} must have 3 channels, got shape {list(pixels.shape)}")
    scale, offset = _affine(normalize)
    planar = np.ascontiguousarray(planar)  # one strided copy of uint8, then contiguous passes
    out = np.empty(planar.shape, dtype=np.float32)
    for channel in range(3):
        np.multiply(planar[:, channel], scale[channel], out=out[:, channel], dtype=np.float32)
        out[:, channel] += offset[channel]
    return out


def encoded_tensor(images: Sequence[bytes]) -> np.ndarray:
    """Image files as an image model's encoded input: a bytes tensor [N, 1], one file per row."""
    out = np.empty((len(images), 1), dtype=object)
    for row, data in enumerate(images):
        out[row, 0] = bytes(data)
    return out


def decode_rows(images: Sequence[bytes], preprocessing: dict, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded images (one per row) as cropped pixels, uint8 [N, crop, crop, 3]. Raises
    ImageError naming the first row that does not decode."""
    resize, crop = preprocessing["resize"], preprocessing["crop"]
    out = np.empty((len(images), crop, crop, 3), dtype=np.uint8)
    for row, data in enumerate(images):
        try:
            out[row] = crop_pixels(load_image(data, max_pixels, min_side=resize), resize, crop)
        except ImageError as exc:
            raise ImageError(f"row {row}: {exc}" if len(images) > 1 else str(exc)) from None
    return out


def image_to_tensor(image: Image.Image, preprocessing: dict) -> np.ndarray:
    """Resize short side, center-crop, scale to [0, 1], normalize: float32 [1, 3, crop, crop]."""
    if preprocessing["kind"] != "image":
        raise ValueError(f"not an image preprocessing: {preprocessing}")
    pixels = crop_pixels(image, preprocessing["resize"], preprocessing["crop"])
    return normalize_pixels(pixels[np.newaxis], preprocessing["normalize"])


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
