import pytest

from streams.serving.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, **kw) -> CircuitBreaker:
    return CircuitBreaker(**{"failure_threshold": 3, "window": 10, "min_calls": 10, "cooldown_s": 5.0, **kw},
                          clock=clock)


def trip(b: CircuitBreaker) -> None:
    while b.state == CLOSED:
        assert b.allow()
        b.record_failure()


def test_consecutive_failures_open_it(clock):
    b = breaker(clock)
    for _ in range(2):
        b.record_failure()
    b.record_success()  # resets the streak
    b.record_failure()
    b.record_failure()
    assert b.state == CLOSED
    b.record_failure()
    assert (b.state, b.allow(), b.opened_count) == (OPEN, False, 1)


def test_error_rate_over_the_window_opens_it(clock):
    b = breaker(clock, failure_threshold=100, error_rate=0.5)
    for _ in range(4):  # 4 of 4 failed, but fewer than min_calls
        b.record_failure()
        b.record_success()
    assert b.state == CLOSED  # 4 of 8
    b.record_success()
    b.record_failure()  # 5 of 10
    assert b.state == OPEN


def test_old_outcomes_leave_the_window(clock):
    b = breaker(clock, failure_threshold=100, error_rate=0.5)
    for _ in range(4):
        b.record_failure()
    for _ in range(10):
        b.record_success()  # the failures slide out
    for _ in range(4):
        b.record_failure()
    assert b.state == CLOSED  # 4 of the last 10


def test_cooldown_then_a_single_probe(clock):
    b = breaker(clock)
    trip(b)
    clock.now += 4.9
    assert (b.state, b.allow()) == (OPEN, False)
    clock.now += 0.1
    assert b.state == HALF_OPEN
    assert b.allow()
    assert not b.allow()  # the probe is out
    assert b.state == HALF_OPEN
    b.record_success()
    assert (b.state, b.allow()) == (CLOSED, True)
    b.record_failure()
    b.record_failure()
    assert b.state == CLOSED  # history was reset by the recovery


def test_failed_probe_reopens_and_restarts_the_cooldown(clock):
    b = breaker(clock)
    trip(b)
    clock.now += 5
    assert b.allow()
    clock.now += 3
    b.record_failure()
    assert (b.state, b.opened_count) == (OPEN, 2)
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()


def test_a_lost_probe_is_replaced_after_a_cooldown(clock):
    b = breaker(clock)
    trip(b)
    clock.now += 5
    assert b.allow()
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()


def test_outcomes_while_open_change_nothing(clock):
    b = breaker(clock)
    trip(b)
    b.record_success()
    b.record_failure()
    assert (b.state, b.opened_count) == (OPEN, 1)
    clock.now += 5
    assert b.state == HALF_OPEN


def test_available_does_not_reserve_the_probe(clock):
    b = breaker(clock)
    trip(b)
    clock.now += 5
    assert b.available() and b.available()
    assert b.allow()
    assert not b.available()


@pytest.mark.parametrize("kw", [{"failure_threshold": 0}, {"error_rate": 0}, {"error_rate": 1.5},
                                {"min_calls": 30, "window": 20}, {"min_calls": 0}])
def test_bad_configuration(kw):
    with pytest.raises(ValueError):
        CircuitBreaker(**kw)
