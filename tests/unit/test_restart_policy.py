"""When `worker --workers N` starts a dead worker again: backoff per recent death, a limit per
minute, and a fresh start once a minute passed without deaths."""

from streams.ops.scaling import RestartPolicy


def test_delay_doubles_with_each_death_in_the_window_up_to_the_cap():
    policy = RestartPolicy(limit=10, first_delay_s=1.0, max_delay_s=5.0, window_s=60.0)
    assert [policy.delay_after_death(t) for t in (0, 1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_more_deaths_than_the_limit_in_the_window_stop_the_restarts():
    policy = RestartPolicy(limit=3, window_s=60.0)
    assert all(policy.delay_after_death(t) is not None for t in (0, 10, 20))
    assert policy.delay_after_death(30) is None


def test_deaths_older_than_the_window_no_longer_count():
    policy = RestartPolicy(limit=2, first_delay_s=1.0, window_s=60.0)
    policy.delay_after_death(0)
    policy.delay_after_death(10)
    assert policy.delay_after_death(70.5) == 1.0  # both earlier deaths are over a minute old
    assert policy.delay_after_death(71) == 2.0


def test_a_limit_of_zero_never_restarts():
    assert RestartPolicy(limit=0).delay_after_death(0) is None
