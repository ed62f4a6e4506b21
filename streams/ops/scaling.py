"""Scaling by partitions: `worker --workers N` runs and supervises several worker processes
(the lag that tells how many: `streams.telemetry.lag`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


# -- several worker processes ------------------------------------------------------------------


class RestartPolicy:
    """When a worker that died on its own starts again: after a delay that doubles with each death
    in the last `window_s` (from `first_delay_s` up to `max_delay_s`), and not at all once it died
    more than `limit` times in that window (a crash loop a restart will not mend)."""

    def __init__(self, limit: int = 5, first_delay_s: float = 1.0, max_delay_s: float = 30.0,
                 window_s: float = 60.0) -> None:
        self.limit, self.first_delay_s, self.max_delay_s, self.window_s = limit, first_delay_s, max_delay_s, window_s
        self._deaths: deque[float] = deque()

    def delay_after_death(self, now: float) -> float | None:
        """Seconds to wait before restarting a worker that died at `now`; None: do not restart."""
        self._deaths.append(now)
        while self._deaths[0] <= now - self.window_s:
            self._deaths.popleft()
        if len(self._deaths) > self.limit:
            return None
        return min(self.max_delay_s, self.first_delay_s * 2 ** (len(self._deaths) - 1))


@dataclass
class _Slot:
    """One of the N worker places: its process, and when it starts again after a death."""

    index: int
    policy: RestartPolicy
    child: subprocess.Popen | None = None
    restart_at: float | None = None


def run_workers(count: int, metrics_port: int = 0, restarts_per_minute: int = 5) -> int:
    """Run `count` worker processes in one consumer group until SIGINT/SIGTERM, which is passed
    on to each. A worker that dies on its own is started again (RestartPolicy); one that dies more
    than `restarts_per_minute` times in a minute stops them all. Returns 0 after a clean stop, 1
    after a crash loop or when a worker failed to stop (killed after `STOP_TIMEOUT_S`)."""
    slots = [_Slot(i, RestartPolicy(limit=restarts_per_minute), restart_at=0.0) for i in range(count)]
    stopping: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        for slot in slots:
            if slot.child is not None and slot.child.poll() is None:
                os.kill(slot.child.pid, signum)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, forward)
    crash_loop = False
    while not stopping and not crash_loop:
        now = time.monotonic()
        for slot in slots:
            if slot.child is not None and slot.child.poll() is not None:
                delay = slot.policy.delay_after_death(now)
                print(f"worker {slot.index} (pid {slot.child.pid}) exited with {slot.child.returncode}; "
                      + ("it died too often, stopping all workers" if delay is None
                         else f"restarting it in {delay:.0f} s"), file=sys.stderr, flush=True)
                slot.child = None
                if delay is None:
                    crash_loop = True
                    break
                slot.restart_at = now + delay
            if slot.child is None and slot.restart_at is not None and now >= slot.restart_at:
                # Signals wait until the new child is in its slot, so that `forward` reaches it
                # (the first start of each worker happens here too).
                signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
                try:
                    if not stopping:
                        slot.child, slot.restart_at = _spawn_worker(slot.index, metrics_port), None
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        time.sleep(0.2)
    codes = [_stop(slot.child, signal_it=not stopping) for slot in slots if slot.child is not None]
    # A worker told to stop while still starting (before its handlers are in place) dies of the
    # signal itself: it had taken nothing, so that is a clean stop too.
    clean = {0, *(-signum for signum in _STOP_SIGNALS)}
    return 0 if not crash_loop and all(code in clean for code in codes) else 1


def _spawn_worker(index: int, metrics_port: int) -> subprocess.Popen:
    env = dict(os.environ)
    if metrics_port > 0:
        env["INFERSTREAM_METRICS_PORT"] = str(metrics_port + index)  # one /metrics per process
    # The lag is the group's, not a worker's: one exporter is enough (and sums stay right).
    if index > 0:
        env["INFERSTREAM_METRICS_LAG"] = "false"
    # Own session: a terminal's Ctrl-C reaches the supervisor only, which forwards it once.
    # The child inherits the signal mask `run_workers` holds while it spawns: it unblocks it.
    return subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, start_new_session=True,
                            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS))


def _stop(child: subprocess.Popen, signal_it: bool) -> int:
    """SIGTERM (unless the signal was already forwarded), a bounded wait, then SIGKILL; the exit
    code."""
    if signal_it and child.poll() is None:
        os.kill(child.pid, signal.SIGTERM)
    try:
        return child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        return -signal.SIGKILL
