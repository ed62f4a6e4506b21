import random

import pytest

from streams.registry.weights import choose, version_order


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
