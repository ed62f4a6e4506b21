"""The runtime wheel: what a worker or a bridge needs, and nothing of the checkout's dev tooling."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = {"streams", "agents", "topics"}


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    # Built from a copy of the checkout's files, so the build leaves nothing in the checkout.
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(source)], check=True, timeout=300)
    (wheel,) = out.glob("inferstream-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_the_wheel_holds_the_runtime_packages_only(wheel_files):
    tops = {name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith(".dist-info")}
    assert tops == RUNTIME
    for module in ("streams/worker/app.py", "streams/bridge/app.py", "streams/cli/__main__.py", "agents/common.py",
                   "topics/events.py", "streams/serving/images.py"):
        assert module in wheel_files


def test_no_stack_manager_harness_model_build_or_tests_in_the_wheel(wheel_files):
    for name in wheel_files:
        assert not name.startswith(("infra/", "models/", "tests/", "bench/")), name
        assert not any(part in name for part in ("stack", "harness", "triton_server", "conftest")), name
