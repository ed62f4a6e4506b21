from streams.gate.ratelimit import Decision, SlidingLog, decide

WINDOW_MS = 60_000


def test_exact_at_the_limit_and_at_the_window_boundary():
    log = SlidingLog(WINDOW_MS)
    decisions = [log.check(f"r{i}", 100, now_ms=i) for i in range(100)]  # r0 at 0 ms ... r99 at 99 ms
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions[-2:]] == [1, 0]

    assert log.check("r100", 100, now_ms=1_000) == Decision(False, 100, 0, 59.0)
    assert not log.check("r100", 100, now_ms=WINDOW_MS - 1).allowed  # r0 is still in the window
    assert log.check("r100", 100, now_ms=WINDOW_MS).allowed  # r0 has just left
    assert not log.check("r101", 100, now_ms=WINDOW_MS).allowed  # r1 leaves 1 ms later
    assert log.check("r101", 100, now_ms=WINDOW_MS + 1).allowed


def test_a_redelivered_request_is_counted_once():
    log = SlidingLog(WINDOW_MS)
    assert log.check("a", 2, now_ms=0).remaining == 1
    assert log.check("a", 2, now_ms=10) == Decision(True, 2, 1, 0.0)
    assert log.check("b", 2, now_ms=20).remaining == 0
    assert log.check("a", 2, now_ms=30).allowed  # already counted, even at the limit
    assert not log.check("c", 2, now_ms=40).allowed


def test_a_redelivery_after_the_window_counts_again():
    log = SlidingLog(WINDOW_MS)
    log.check("a", 1, now_ms=0)
    assert log.hit("a", 1, now_ms=WINDOW_MS) == (True, 1, WINDOW_MS)


def test_retry_after_is_when_the_oldest_entry_leaves():
    log = SlidingLog(WINDOW_MS)
    log.check("a", 2, now_ms=1_000)
    log.check("b", 2, now_ms=5_000)
    assert log.check("c", 2, now_ms=30_000).retry_after_s == 31.0
    assert log.check("c", 2, now_ms=61_000).allowed
    assert log.check("d", 2, now_ms=61_000).retry_after_s == 4.0


def test_zero_limit_refuses_everything():
    log = SlidingLog(WINDOW_MS)
    assert log.check("a", 0, now_ms=0) == Decision(False, 0, 0, 60.0)


def test_decide():
    assert decide(True, 3, 0, 5, 100, WINDOW_MS) == Decision(True, 5, 2, 0.0)
    assert decide(False, 5, 500, 5, 1_500, WINDOW_MS) == Decision(False, 5, 0, 59.0)
    assert decide(False, 7, 500, 5, 1_500, WINDOW_MS).remaining == 0  # a lowered limit
