"""A balancer over the backends of one version, free of I/O: least outstanding requests among
those whose breaker lets a call through."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from streams.serving.breaker import CircuitBreaker

T = TypeVar("T")


@dataclass
class _Slot(Generic[T]):
    name: str
    backend: T
    breaker: CircuitBreaker
    outstanding: int = 0


class Balancer(Generic[T]):
    """Least outstanding requests among the backends whose breaker lets a call through; ties go
    round robin so idle backends share the load."""

    def __init__(
        self,
        backends: Mapping[str, T],
        breaker: Callable[[], CircuitBreaker] = CircuitBreaker,
    ) -> None:
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        self._slots = [_Slot(name, backend, breaker()) for name, backend in backends.items()]
        self._next = 0  # where the next tie-break scan starts

    def pick(self, exclude: Collection[T] = ()) -> T | None:
        """A backend to call, none of `exclude` (those a request already failed on), or None when
        every other breaker is open. The pick reserves the breaker's probe when half-open, so it
        must be followed by `begin` and `end` (or use `call`)."""
        count = len(self._slots)
        ring = [(self._next + i) % count for i in range(count)]
        ready = [i for i in ring
                 if self._slots[i].breaker.available() and self._slots[i].backend not in exclude]
        if not ready:
            return None
        chosen = min(ready, key=lambda i: self._slots[i].outstanding)  # min keeps the first of equals
        self._next = (chosen + 1) % count
        slot = self._slots[chosen]
        slot.breaker.allow()
        return slot.backend

    def begin(self, backend: T) -> None:
        self._slot(backend).outstanding += 1

    def end(self, backend: T, ok: bool) -> None:
        slot = self._slot(backend)
        slot.outstanding -= 1
        if ok:
            slot.breaker.record_success()
        else:
            slot.breaker.record_failure()

    @contextmanager
    def call(self) -> Iterator[T | None]:
        """Pick, track and record one call: an exception out of the block (cancellation included)
        counts as the backend's failure. Yields None, and records nothing, when all are open."""
        backend = self.pick()
        if backend is None:
            yield None
            return
        self.begin(backend)
        try:
            yield backend
        except BaseException:
            self.end(backend, ok=False)
            raise
        self.end(backend, ok=True)

    def states(self) -> dict[str, str]:
        return {slot.name: slot.breaker.state for slot in self._slots}

    def outstanding(self) -> dict[str, int]:
        return {slot.name: slot.outstanding for slot in self._slots}

    def _slot(self, backend: T) -> _Slot[T]:
        # By equality (identity unless the backend type defines __eq__): need not be hashable.
        for slot in self._slots:
            if slot.backend == backend:
                return slot
        raise KeyError(f"not a backend of this balancer: {backend!r}")
