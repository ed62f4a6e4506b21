"""Dev tooling of the checkout (not in the runtime wheel): the local stack, the test harness and
the tritonserver runner. Run from the checkout's root (`python -m infra.local ...`)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
