"""Serve models of an inferstream model repository from tritonserver, through PyTriton.

    .venv-triton/bin/python infra/triton/serve.py --repository models/repository --model tiny \
        --http-port 8000 --grpc-port 8001 --metrics-port 8002

Each model runs in onnxruntime inside a Python callable bound to PyTriton, with Triton's dynamic
batcher in front. Input/output names and dtypes come from the model's inferstream.json. Every
port binds 127.0.0.1. Runs until SIGTERM (or SIGINT), then stops tritonserver and removes its
workspace (7-10 s).

Runs under .venv-triton's python (numpy<2): it imports nothing from the project.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

log = logging.getLogger("triton-serve")

LOOPBACK = "127.0.0.1"
MODEL_VERSION = "1"
# PyTriton's default token-protected endpoints less "statistics": loopback only, and the
# per-model batch counts are what a benchmark of the dynamic batcher needs.
RESTRICTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]

terminated = threading.Event()


def use_interpreter_libdir() -> None:
    """Put this interpreter's libpython first for the Python backend stub tritonserver starts.

    The stub links the system libpython; under another build of the same version (pyenv, a venv
    from it) model loading fails with "'_thread.RLock' object has no attribute
    '_recursion_count'". tritonserver and its stubs inherit os.environ, so no re-exec is needed.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def infer_function(session: ort.InferenceSession, output_names: list[str]):
    @batch  # PyTriton hands over the dynamic batcher's requests stacked along axis 0
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(output_names, session.run(output_names, inputs)))

    return infer


def tensors(specs: list[dict]) -> list[Tensor]:
    """PyTriton tensors from inferstream.json entries; the batch axis is Triton's to add."""
    return [Tensor(name=s["name"], dtype=np.dtype(s["dtype"]).type, shape=tuple(s["shape"][1:]))
            for s in specs]


def bind_model(triton: Triton, model_dir: Path, max_batch: int, queue_delay_us: int) -> None:
    metadata = json.loads((model_dir / "inferstream.json").read_text())
    session = ort.InferenceSession(str(model_dir / MODEL_VERSION / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    output_names = [s["name"] for s in metadata["outputs"]]
    triton.bind(
        model_name=metadata["name"],
        infer_func=infer_function(session, output_names),
        inputs=tensors(metadata["inputs"]),
        outputs=tensors(metadata["outputs"]),
        config=ModelConfig(
            max_batch_size=min(metadata["max_batch_size"], max_batch),
            batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us),
        ),
        strict=True,
    )
    log.info("bound %s (max batch %d)", metadata["name"], min(metadata["max_batch_size"], max_batch))


def triton_config(args: argparse.Namespace) -> TritonConfig:
    return TritonConfig(
        http_address=LOOPBACK, http_port=args.http_port,
        grpc_address=LOOPBACK, grpc_port=args.grpc_port,
        metrics_address=LOOPBACK, metrics_port=args.metrics_port,
        allow_sagemaker=False, allow_vertex_ai=False,
        exit_timeout_secs=5,
    )


def on_terminate(signum: int, _frame) -> None:
    # Triton.serve() stops tritonserver and cleans its workspace on KeyboardInterrupt.
    terminated.set()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def serve(args: argparse.Namespace) -> int:
    security = TritonSecurityConfig(restricted_endpoints=RESTRICTED_ENDPOINTS)
    with (
        tempfile.TemporaryDirectory(prefix="inferstream-triton-") as tmp,
        # PyTriton creates the workspace directory itself and deletes it on stop.
        Triton(config=triton_config(args), workspace=Path(tmp) / "workspace",
               security_config=security) as triton,
    ):
        for name in args.model:
            bind_model(triton, args.repository / name, args.max_batch, args.queue_delay_us)
        log.info("serving %s: http %s:%d, grpc %s:%d, metrics %s:%d", ", ".join(args.model),
                 LOOPBACK, args.http_port, LOOPBACK, args.grpc_port, LOOPBACK, args.metrics_port)
        triton.serve()
    if terminated.is_set():
        return 0
    log.error("tritonserver or a model's proxy exited")
    return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", nargs="+", required=True, help="model names in the repository")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=64,
                        help="cap on each model's max_batch_size from inferstream.json")
    parser.add_argument("--queue-delay-us", type=int, default=100,
                        help="the dynamic batcher's wait for a fuller batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    use_interpreter_libdir()
    signal.signal(signal.SIGTERM, on_terminate)
    signal.signal(signal.SIGINT, on_terminate)
    try:
        return serve(args)
    except KeyboardInterrupt:  # a signal during start-up: the with blocks above cleaned up
        return 0


if __name__ == "__main__":
    sys.exit(main())
