"""`/v1/models/{model}/classify`: an image in (raw bytes or a multipart 'image' part), the
model's top-k labels out."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import BodyPartReader, web

from streams.bridge.openapi import CALLER, INFERENCE, Endpoint
from streams.bridge.requests import TIMEOUT_HEADER, int_param
from streams.serving.images import ImageError, load_labels, probabilities, top_k
from topics.errors import ErrorCode, EventError

if TYPE_CHECKING:
    from streams.bridge.app import Bridge


async def classify(bridge: Bridge, request: web.Request) -> web.Response:
    info = bridge.resolve(request)
    labels = load_labels(info.model_dir, info.model_dump())
    if not info.preprocessing or not labels:
        raise EventError(ErrorCode.INVALID_REQUEST, f"model {info.name} does not classify images")
    k = int_param(request, "top_k", 5, 1, len(labels))
    data = await _image_bytes(request)
    try:
        # The file as it came where the model takes it (the worker decodes it with its batch,
        # check_inputs refuses a bad header here), else decoded here, off the event loop.
        inputs = (info.image_file_inputs(data) if info.image_forms and info.image_forms.encoded
                  else await asyncio.to_thread(info.image_file_inputs, data))
    except ImageError as exc:
        raise EventError(ErrorCode.INVALID_IMAGE, str(exc)) from None
    result, outputs = await bridge.call(request, info, inputs)
    probs = probabilities(outputs[info.outputs[0].name], info.postprocessing)[0]
    return web.json_response({
        "model": info.name, "model_version": result.header.model_version,
        "request_id": result.header.request_id, "timings_ms": result.header.timings_ms,
        "predictions": [{"class": i, "label": label, "probability": round(float(p), 6)}
                        for i, label, p in top_k(probs, labels, k)],
    })


async def _image_bytes(request: web.Request) -> bytes:
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.name in ("image", "file"):
                return bytes(await part.read())
        raise EventError(ErrorCode.INVALID_REQUEST, "multipart body has no 'image' part")
    data = await request.read()
    if not data:
        raise EventError(ErrorCode.INVALID_REQUEST, "empty body: send the image bytes")
    return data


ROUTES = [
    Endpoint("POST", "/v1/models/{model}/classify", classify, "Classify an image (raw bytes or multipart 'image')",
             body="image", query=("top_k",), headers=(*CALLER, TIMEOUT_HEADER),
             errors=(*INFERENCE, ErrorCode.INVALID_IMAGE)),
]
