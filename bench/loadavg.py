"""The box's load average beside every benchmark's figures, and a warning when the box is busy.

A benchmark never refuses to run on a busy box: it says so, and records the load average (from
/proc/loadavg) before and after its run, in its printed table and its JSON.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

LOADAVG = Path("/proc/loadavg")
BUSY_SHARE = 0.5  # a 1-minute load above this share of the cores makes the figures suspect


def load_average(path: Path = LOADAVG) -> dict:
    """The 1-, 5- and 15-minute load averages and the box's core count."""
    load1, load5, load15 = (float(v) for v in path.read_text().split()[:3])
    return {"load1": load1, "load5": load5, "load15": load15, "cores": os.cpu_count() or 1}


def busy_warning(load: dict, share: float = BUSY_SHARE) -> str | None:
    """A warning when the 1-minute load exceeds `share` of the cores; None on a quiet box."""
    limit = share * load["cores"]
    if load["load1"] <= limit:
        return None
    return (f"the box is busy: 1-min load {load['load1']:.2f} > {limit:.2g} "
            f"({share:g} x {load['cores']} cores); other work shares the cores, read the figures "
            f"with care")


def describe(load: dict) -> str:
    return f"{load['load1']:.2f} {load['load5']:.2f} {load['load15']:.2f} ({load['cores']} cores)"


def before_run(console: Console) -> dict:
    """The load average before a run, with a warning printed when the box is busy."""
    load = load_average()
    warning = busy_warning(load)
    console.log(f"load average before the run: {describe(load)}")
    if warning:
        console.log(f"[yellow]warning: {warning}[/yellow]")
    return load


def summary(before: dict, after: dict) -> str:
    """One line for under a table: the load averages around the run, flagged when busy."""
    line = f"load average (1/5/15 min) before: {describe(before)}, after: {describe(after)}"
    if busy_warning(before):
        line += " [yellow]busy box before the run: read the figures with care[/yellow]"
    return line


def record(before: dict, after: dict) -> dict:
    """The JSON field: both readings and whether the box was busy before the run."""
    return {"before": before, "after": after, "busy_share": BUSY_SHARE,
            "busy_before": busy_warning(before) is not None}
