from functools import partial

import pytest

from streams.serving.balancer import Balancer
from streams.serving.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def balancer(clock: Clock | None = None) -> Balancer[str]:
    factory = partial(CircuitBreaker, failure_threshold=1, cooldown_s=5.0, clock=clock or Clock())
    return Balancer({"a": "http://a", "b": "http://b", "c": "http://c"}, factory)


def test_ties_go_round_robin():
    lb = balancer()
    picks = []
    for _ in range(6):
        with lb.call() as backend:
            picks.append(backend)
    assert picks == ["http://a", "http://b", "http://c"] * 2


def test_least_outstanding_wins():
    lb = balancer()
    held = []
    for _ in range(3):
        backend = lb.pick()
        lb.begin(backend)
        held.append(backend)
    lb.end(held[1], ok=True)  # b has nothing in flight now
    assert lb.pick() == "http://b"
    assert lb.outstanding() == {"a": 1, "b": 0, "c": 1}


def test_open_breakers_are_skipped_and_none_when_all_are_open():
    clock = Clock()
    lb = balancer(clock)
    with pytest.raises(RuntimeError), lb.call() as backend:
        assert backend == "http://a"
        raise RuntimeError("backend down")
    assert lb.states() == {"a": OPEN, "b": CLOSED, "c": CLOSED}
    assert {lb.pick() for _ in range(6)} == {"http://b", "http://c"}
    for name in ("http://b", "http://c"):
        lb.begin(name)
        lb.end(name, ok=False)
    assert lb.pick() is None
    with lb.call() as backend:
        assert backend is None

    clock.now += 5
    assert set(lb.states().values()) == {HALF_OPEN}
    probes = [lb.pick() for _ in range(4)]
    assert sorted(probes[:3]) == ["http://a", "http://b", "http://c"] and probes[3] is None
    lb.begin("http://a")
    lb.end("http://a", ok=True)
    assert lb.states()["a"] == CLOSED


def test_unknown_backend():
    with pytest.raises(KeyError):
        balancer().begin("http://elsewhere")
    with pytest.raises(ValueError):
        Balancer({})


def test_a_retry_never_returns_to_a_backend_it_failed_on():
    balancer = Balancer({"a": "A", "b": "B"})
    balancer.begin("B")  # B is busier, so A would win on outstanding requests
    assert balancer.pick() == "A"
    assert balancer.pick(exclude=["A"]) == "B"
    assert balancer.pick(exclude=["A", "B"]) is None
