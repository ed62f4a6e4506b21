"""A circuit breaker per backend, free of I/O: stop sending calls to a backend that keeps failing,
and let a single probe call find out when it has recovered.

CLOSED: calls pass; N consecutive failures, or an error rate at or above the threshold over the
last `window` calls (once at least `min_calls` are in it), opens the breaker.
OPEN: calls are refused until `cooldown_s` has passed, then the breaker is HALF_OPEN.
HALF_OPEN: one probe call at a time; its success closes the breaker (history reset), its failure
opens it again (cooldown restarts).

Every `allow()` that returns True must be followed by `record_success()` or `record_failure()`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        error_rate: float = 0.5,
        window: int = 20,
        min_calls: int = 10,
        cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or window < 1 or not 1 <= min_calls <= window:
            raise ValueError("need failure_threshold >= 1 and 1 <= min_calls <= window")
        if not 0 < error_rate <= 1:
            raise ValueError("error_rate must be in (0, 1]")
        self.failure_threshold = failure_threshold
        self.error_rate = error_rate
        self.min_calls = min_calls
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = CLOSED
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = failure
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_since: float | None = None  # when the half-open probe was handed out
        self.opened_count = 0

    @property
    def state(self) -> str:
        if self._state == OPEN and self._cooled_down():
            return HALF_OPEN
        return self._state

    def available(self) -> bool:
        """Whether `allow()` would return True now, without reserving the probe."""
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self._probe_in_flight())

    def allow(self) -> bool:
        if not self.available():
            return False
        if self.state == HALF_OPEN:
            self._state = HALF_OPEN
            self._probe_since = self._clock()
        return True

    def record_success(self) -> None:
        if self._state == HALF_OPEN:
            self._close()
        elif self._state == CLOSED:
            self._consecutive = 0
            self._outcomes.append(False)
        # OPEN: a call that started before the breaker opened; it does not shorten the cooldown.

    def record_failure(self) -> None:
        if self._state == HALF_OPEN:
            self._open()
        elif self._state == CLOSED:
            self._consecutive += 1
            self._outcomes.append(True)
            if self._consecutive >= self.failure_threshold or self._rate_tripped():
                self._open()

    def _rate_tripped(self) -> bool:
        calls = len(self._outcomes)
        return calls >= self.min_calls and sum(self._outcomes) / calls >= self.error_rate

    def _cooled_down(self) -> bool:
        return self._clock() - self._opened_at >= self.cooldown_s

    def _probe_in_flight(self) -> bool:
        # A probe that never reports (its caller was lost) must not wedge the backend forever:
        # after a cooldown without an answer another probe may go.
        return self._probe_since is not None and self._clock() - self._probe_since < self.cooldown_s

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._probe_since = None
        self.opened_count += 1

    def _close(self) -> None:
        self._state = CLOSED
        self._outcomes.clear()
        self._consecutive = 0
        self._probe_since = None
