import random
from functools import partial

import pytest

from streams.serving.balancer import Balancer, choose, version_order
from streams.serving.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def keys(n: int) -> list[str]:
    rng = random.Random(7)
    return [f"req-{rng.getrandbits(64):016x}" for _ in range(n)]


def test_choice_is_sticky_and_the_same_in_every_process():
    # Fixed expectations: a per-process salted hash would break them between runs.
    assert [choose({"1": 1, "2": 1}, k) for k in ["alpha", "beta", "gamma", "delta"]] == ["1", "1", "2", "1"]
    assert all(choose({"1": 3, "2": 7}, k) == choose({"1": 3, "2": 7}, k) for k in keys(100))


def test_a_90_10_split():
    picks = [choose({"1": 90, "2": 10}, k) for k in keys(2_000)]
    assert abs(picks.count("2") / len(picks) - 0.10) < 0.03


def test_raising_the_canary_only_moves_keys_onto_it():
    before = {k: choose({"1": 90, "2": 10}, k) for k in keys(2_000)}
    after = {k: choose({"1": 80, "2": 20}, k) for k in keys(2_000)}
    assert all(after[k] == "2" for k, v in before.items() if v == "2")
    assert sum(v == "2" for v in after.values()) > sum(v == "2" for v in before.values())


def test_zero_weights_are_never_chosen():
    weights = {"1": 0, "2": 5, "3": 0, "10": 5}
    assert {choose(weights, k) for k in keys(500)} == {"2", "10"}


@pytest.mark.parametrize("weights", [{}, {"1": 0, "2": 0}, {"1": 5, "2": -1}])
def test_unusable_weights(weights):
    with pytest.raises(ValueError):
        choose(weights, "k")


def test_versions_sort_numerically():
    assert sorted(["10", "2", "b", "1", "a"], key=version_order) == ["1", "2", "10", "a", "b"]


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
