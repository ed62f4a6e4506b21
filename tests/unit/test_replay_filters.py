"""The pure selection logic of replay and dead-letter redrive."""

from __future__ import annotations

import numpy as np
import pytest

from streams.ops.dlq import Letter, select
from streams.ops.replay import (
    Filters,
    Pair,
    compare_pairs,
    parse_offsets,
    parse_positions,
    parse_time,
    plan_ranges,
    replay_copy,
)
from topics.errors import ErrorCode
from topics.events import DeadLetter, InferenceRequest


def request(**fields) -> InferenceRequest:
    return InferenceRequest(**{"request_id": "r1", "model": "tiny", **fields})


def test_times_parse_from_unix_ms_and_iso():
    assert parse_time("1700000000123") == 1700000000123
    assert parse_time("2024-01-01T00:00:00Z") == 1704067200000
    assert parse_time("2024-01-01T00:00:00") == 1704067200000  # no zone: UTC
    assert parse_time("2024-01-01T01:00:00+01:00") == 1704067200000


def test_offsets_parse_and_refuse_garbage():
    assert parse_offsets(["0:5", "3:10"]) == {0: 5, 3: 10}
    assert parse_positions(["0:5", "0:7"]) == [(0, 5), (0, 7)]
    for bad in ("5", "a:1", "1:-2", ""):
        with pytest.raises(ValueError):
            parse_offsets([bad])


def test_ranges_narrow_by_time_offsets_and_checkpoint():
    bounds = {0: (0, 100), 1: (10, 50)}
    assert plan_ranges(bounds) == {0: (0, 100), 1: (10, 50)}
    assert plan_ranges(bounds, since={0: 20, 1: 50}) == {0: (20, 100), 1: (50, 50)}
    assert plan_ranges(bounds, resume={0: 30}) == {0: (30, 100), 1: (10, 50)}


def test_explicit_offsets_are_inclusive_and_restrict_partitions():
    bounds = {0: (0, 100), 1: (0, 100), 2: (5, 9)}
    assert plan_ranges(bounds, from_offsets={0: 10}, to_offsets={0: 19}) == {0: (10, 20)}
    assert plan_ranges(bounds, to_offsets={1: 500, 2: 1}) == {1: (0, 100), 2: (5, 5)}


def test_filters_match_model_tenant_ids_and_errors():
    assert Filters().match(request())
    assert not Filters(model="other").match(request())
    assert Filters(request_ids=frozenset({"r1"})).match(request())
    assert not Filters(request_ids=frozenset({"r2"})).match(request())
    assert Filters(tenant="acme").match(request(tenant="acme"))
    assert Filters(tenant="acme").match(request(), {"status": "ok", "tenant": "acme"})  # set by the auth stage
    assert not Filters(tenant="acme").match(request(), None)
    errors = Filters(errors_only=True)
    assert errors.needs_results and not Filters(model="tiny").needs_results
    assert errors.match(request(), {"status": "error", "tenant": None})
    assert not errors.match(request(), {"status": "ok", "tenant": None})
    assert not errors.match(request(), None)


def test_replay_copy_is_deterministic_silent_and_traceable():
    original = request(reply_to="my.replies", correlation_id="c1", deadline_ms=1, batch_id="b", version="1")
    copy = replay_copy(original, "nightly", "t.requests", 2, 41, version="2")
    assert copy.request_id == "replay-nightly-2-41" == replay_copy(original, "nightly", "t.requests", 2, 41).request_id
    assert (copy.reply_to, copy.correlation_id, copy.deadline_ms, copy.batch_id) == (None, None, None, None)
    assert copy.version == "2" and replay_copy(original, "n", "t", 0, 0).version == "1"
    assert copy.replay_of.model_dump() == {"topic": "t.requests", "partition": 2, "offset": 41, "request_id": "r1"}
    assert original.request_id == "r1" and original.reply_to == "my.replies"


def test_compare_counts_agreement_diffs_and_status_changes():
    a = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    pairs = [
        Pair("same", "r-same", "ok", "ok", a, a.copy(), 10.0, 12.0),
        Pair("flip", "r-flip", "ok", "ok", a, a[:, ::-1].copy(), 10.0, 8.0),
        Pair("fail", "r-fail", "ok", "error", a, None, 10.0, None),
    ]
    report = compare_pairs(pairs, "2")
    assert report["compared"] == 2 and report["status_changes"] == 1
    assert report["top1_agreement"] == 0.5
    assert [c["request_id"] for c in report["top1_changes"]] == ["flip"]
    assert report["differing"] == ["flip", "fail"]
    assert report["max_abs_diff"]["max"] == pytest.approx(0.8)
    assert report["latency_diff_ms"]["mean"] == pytest.approx(0.0)


def letter(partition: int, offset: int, reason: ErrorCode) -> Letter:
    body = DeadLetter(reason=reason, message="m", source_topic="t.requests", source_partition=0,
                      source_offset=0, original_b64="e30=")
    return Letter(partition, offset, None, [], body)


def test_dead_letters_select_by_position_and_reason():
    letters = [letter(0, 1, ErrorCode.UNKNOWN_VERSION), letter(0, 2, ErrorCode.INVALID_SCHEMA),
               letter(1, 1, ErrorCode.UNKNOWN_VERSION)]
    assert select(letters) == letters
    assert select(letters, positions={(0, 2), (1, 1)}) == letters[1:]
    assert select(letters, reasons={"UNKNOWN_VERSION"}) == [letters[0], letters[2]]
    assert select(letters, positions={(0, 2)}, reasons={"UNKNOWN_VERSION"}) == []
