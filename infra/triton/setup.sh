#!/usr/bin/env bash
# Create .venv-triton: PyTriton (which bundles tritonserver) and onnxruntime for
# infra/triton/serve.py. A venv of its own because nvidia-pytriton pins numpy<2 and the project
# needs numpy>=2. Re-running is cheap and silent: it reinstalls only when the pins below change.
# Says what it is doing, step by step; pip's own output goes to .venv-triton/setup.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
. infra/local/steps.sh

PYTHON=${PYTHON:-python3}
PACKAGES=(nvidia-pytriton==0.7.0 onnxruntime==1.31.1 "numpy<2")
VENV=.venv-triton

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV (Triton's own environment)"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    echo "cannot create $VENV: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  fi
  done_step
fi

stamp="$VENV/.inferstream-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  STEP_LOG=$VENV/setup.log
  : > "$STEP_LOG"
  step "upgrading pip in $VENV"
  quietly "$VENV/bin/python" -m pip install --upgrade pip
  done_step
  step "installing ${PACKAGES[*]} into $VENV: about 430 MB, 15 s to a few minutes on a first run"
  quietly "$VENV/bin/python" -m pip install "${PACKAGES[@]}"
  done_step
  rm -f "$VENV"/.inferstream-* && touch "$stamp"
fi
