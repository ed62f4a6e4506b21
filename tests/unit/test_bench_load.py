"""The benchmarks' pure rules: the busy-box warning from /proc/loadavg and the floor ratio."""

from __future__ import annotations

from pathlib import Path

from bench.floor import ratio
from bench.loadavg import busy_warning, load_average, record, summary


def test_load_average_reads_the_three_figures(tmp_path: Path) -> None:
    path = tmp_path / "loadavg"
    path.write_text("1.05 0.46 0.54 2/178 7789\n")
    load = load_average(path)
    assert (load["load1"], load["load5"], load["load15"]) == (1.05, 0.46, 0.54)
    assert load["cores"] >= 1


def test_busy_above_half_the_cores() -> None:
    assert busy_warning({"load1": 1.0, "cores": 2}) is None  # at the limit: still quiet
    warning = busy_warning({"load1": 1.01, "cores": 2})
    assert warning is not None and "1.01" in warning
    assert busy_warning({"load1": 3.0, "cores": 8}) is None
    assert busy_warning({"load1": 3.0, "cores": 8}, share=0.25) is not None


def test_record_and_summary_flag_a_busy_start() -> None:
    quiet = {"load1": 0.1, "load5": 0.2, "load15": 0.3, "cores": 2}
    busy = {**quiet, "load1": 4.0}
    assert record(quiet, busy)["busy_before"] is False
    assert record(busy, quiet)["busy_before"] is True
    assert "busy" not in summary(quiet, busy)
    assert "busy" in summary(busy, quiet)


def test_pipeline_over_floor() -> None:
    assert ratio(1000.0, 4000.0) == 0.25
    assert ratio(1000.0, None) is None
    assert ratio(1000.0, 0.0) is None
