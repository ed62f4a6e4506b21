"""Images as they travel best, through the real pipeline: an image file (PNG, JPEG) or uint8
pixels in, the same answer as the float32 tensor; a bad image fails its own request only."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from infra.local.harness import wait_ready
from streams.client import InferenceClient
from streams.registry.records import ModelRegistry
from streams.serving.images import (
    crop_pixels,
    encoded_tensor,
    image_to_tensor,
    load_image,
    load_labels,
    probabilities,
    top_k,
)

pytestmark = pytest.mark.integration
CHELSEA = Path(skimage.data.__file__).parent / "chelsea.png"
MODEL = "efficientnet-lite0"


def as_jpeg(path: Path, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


async def test_an_image_file_or_its_pixels_get_the_float32_tensors_answer(start_worker, settings):
    info = ModelRegistry.load(settings.model_repository).resolve(MODEL)
    pre = info.preprocessing or {}
    files = {"png": CHELSEA.read_bytes(), "jpeg": as_jpeg(CHELSEA)}
    forms = {}
    for kind, data in files.items():  # each file as the float32 tensor made here, as itself, as its pixels
        image = load_image(data)
        forms[f"{kind} float32"] = {"input": image_to_tensor(image, pre)}
        forms[f"{kind} file"] = {"image": encoded_tensor([data])}
        forms[f"{kind} pixels"] = {"pixels": crop_pixels(image, pre["resize"], pre["crop"])[np.newaxis]}
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        results = dict(zip(forms, await asyncio.gather(
            *(client.infer(MODEL, inputs, timeout=60) for inputs in forms.values()))))
    labels = load_labels(info.model_dir, info.model_dump())
    probs = {}
    for form, result in results.items():
        assert result.header.status == "ok", (form, result.header.error)
        probs[form] = probabilities(result.tensors["logits"], info.postprocessing)[0]
    for kind in files:
        best = top_k(probs[f"{kind} float32"], labels, k=1)[0]
        assert 281 <= best[0] <= 285 and "cat" in best[1], (kind, best)  # tabby, tiger cat, ...
        for form in (f"{kind} file", f"{kind} pixels"):  # the same pixels: the same answer up to rounding
            assert top_k(probs[form], labels, k=1)[0][0] == best[0], form
            np.testing.assert_allclose(probs[form], probs[f"{kind} float32"], atol=1e-4, err_msg=form)


async def test_a_bad_image_fails_its_own_request_and_the_others_are_answered(start_worker, settings):
    jpeg = as_jpeg(CHELSEA)
    truncated = jpeg[:len(jpeg) // 3]  # its header reads: admitted, and fails to decode in the worker
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        sent = [jpeg, truncated, jpeg, b"not an image", jpeg]
        results = await asyncio.gather(*(client.infer(MODEL, {"image": encoded_tensor([data])}, timeout=60)
                                         for data in sent))
    codes = [r.header.error.code.value if r.header.error else "ok" for r in results]
    assert codes == ["ok", "INVALID_IMAGE", "ok", "INVALID_IMAGE", "ok"], [r.header.error for r in results]
    assert "truncated or corrupt" in results[1].header.error.message  # type: ignore[union-attr]
    assert "not an image" in results[3].header.error.message  # type: ignore[union-attr]


async def test_tritonclient_sends_an_image_file_as_bytes_through_the_bridge(start_worker, start_bridge):
    """What an ensemble's caller does: the encoded image as a BYTES tensor, binary or JSON
    (a JSON string holds text only, so a binary file goes in binary)."""
    import tritonclient.http.aio as triton

    start_worker()
    bridge = await start_bridge()
    await bridge.wait_ready(90, path="/v2/health/ready")
    client = triton.InferenceServerClient(bridge.url.removeprefix("http://"))
    try:
        meta = await client.get_model_metadata(MODEL)
        assert {"name": "image", "datatype": "BYTES", "shape": [-1, 1]} in meta["inputs"]
        image = triton.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(encoded_tensor([as_jpeg(CHELSEA)]))
        result = None
        for _ in range(30):  # the worker may still be joining its group
            try:
                result = await client.infer(MODEL, [image], headers={"X-Inferstream-Timeout": "5"})
                break
            except Exception as exc:  # noqa: BLE001
                if "deadline" not in str(exc).lower():
                    raise
        assert result is not None
        assert 281 <= int(np.argmax(result.as_numpy("logits")[0])) <= 285
        bad = triton.InferInput("image", [1, 1], "BYTES")
        bad.set_data_from_numpy(encoded_tensor([b"GIF89a, or so it says"]))
        with pytest.raises(Exception, match="not an image"):
            await client.infer(MODEL, [bad])
    finally:
        await client.close()
