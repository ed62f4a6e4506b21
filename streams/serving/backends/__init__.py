"""Model backends: where a version's batches run. A backend is one module here whose class follows
`Backend` (the module names it `BACKEND`), listed in `BACKENDS` under its kind (`BackendSpec.kind`
in a version record).

The table names each module by its path, imported on first use: processes that only read records
or route requests (the bridge, the CLI, the registry's store) never import onnxruntime or
tritonclient.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Self, cast

import numpy as np

if TYPE_CHECKING:
    from streams.registry.records import BackendSpec, ModelInfo
    from streams.settings import Settings

Tensors = dict[str, np.ndarray]
# One entry per request of a batch: its outputs, or the error that hit it alone.
Results = Sequence[Tensors | BaseException]


class Backend(Protocol):
    """A version's model on one backend, as a version server drives it: `load`ed when the worker
    starts serving the version, then batches (`run_batch`) until `close`. Its health is what its
    batches show: the version server's breaker opens on the failures `run_batch` raises."""

    @classmethod
    async def check(cls, info: ModelInfo, spec: BackendSpec, settings: Settings) -> None:
        """For a registration: raise ValueError, with a reason fit to show its caller, unless
        the version can run here (`info.path`: the artifact's local copy)."""

    @classmethod
    async def load(cls, info: ModelInfo, spec: BackendSpec, settings: Settings) -> Self:
        """Ready to run batches (a remote backend not reachable yet may connect on its first)."""

    def run_batch(self, batch: list[Tensors]) -> Results | Awaitable[Results]:
        """One entry per request; raising fails the whole batch over to another backend. A
        CPU-bound backend runs it as a plain call (the batcher gives it a thread), a remote one
        as a coroutine."""

    async def close(self) -> None:
        """Release what `load` took."""


@dataclass(frozen=True)
class BackendEntry:
    module: str  # the module whose BACKEND is the backend's class
    # Turns an image model's pixels and encoded images into its float32 input itself: a version
    # takes those forms only when every one of its backends does.
    prepares_images: bool


BackendKind = Literal["onnxruntime", "triton"]
BACKENDS: dict[BackendKind, BackendEntry] = {
    "onnxruntime": BackendEntry("streams.serving.backends.onnx", prepares_images=True),
    "triton": BackendEntry("streams.serving.backends.triton", prepares_images=False),
}


def backend_class(kind: BackendKind) -> type[Backend]:
    return cast(type[Backend], importlib.import_module(BACKENDS[kind].module).BACKEND)
