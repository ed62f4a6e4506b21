"""The HTTP bridge on the real stack: Open Inference Protocol, classify, jobs, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data

from streams.harness import tiny_input

pytestmark = pytest.mark.integration
CHELSEA = Path(skimage.data.__file__).parent / "chelsea.png"


async def test_tritonclient_infers_through_the_bridge(start_worker, start_bridge, settings):
    import tritonclient.http.aio as triton

    from streams.onnx_backend import OnnxModel
    from streams.registry import ModelRegistry

    start_worker()
    bridge = await start_bridge()
    client = triton.InferenceServerClient(bridge.url.removeprefix("http://"))
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("tiny")
        meta = await client.get_model_metadata("tiny")
        assert meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["datatype"] == "FP32"
        x = tiny_input(rows=4, seed=11)["x"]
        for binary in (True, False):
            inp = triton.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = triton.InferRequestedOutput("y", binary_data=binary)
            result = None
            for _ in range(30):  # the worker may still be joining its group
                try:
                    result = await client.infer("tiny", [inp], outputs=[out])
                    break
                except Exception as exc:  # noqa: BLE001
                    if "DEADLINE" not in str(exc) and "deadline" not in str(exc):
                        raise
            assert result is not None
            direct = OnnxModel(ModelRegistry.load(settings.model_repository).resolve("tiny")).run({"x": x})
            np.testing.assert_array_equal(result.as_numpy("y"), direct["y"])
    finally:
        await client.close()
