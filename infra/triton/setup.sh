#!/usr/bin/env bash
# Create .venv-triton: PyTriton (which bundles tritonserver) and onnxruntime for
# infra/triton/serve.py. A venv of its own because nvidia-pytriton pins numpy<2 and the project
# needs numpy>=2. Re-running is cheap and silent: it reinstalls only when the pins below change.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
PACKAGES=(nvidia-pytriton==0.7.0 onnxruntime==1.31.1 "numpy<2")
VENV=.venv-triton

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    echo "cannot create $VENV: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  fi
fi

stamp="$VENV/.inferstream-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${PACKAGES[@]}"
  rm -f "$VENV"/.inferstream-* && touch "$stamp"
fi
