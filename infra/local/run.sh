#!/usr/bin/env bash
# The main job on the embedded defaults: environment, models (built if missing), local stack
# (broker with durable S3 storage, S3 server, PostgreSQL, Redis), topics and a worker.
# Ctrl-C stops what it started; the next run reuses the stored data in .inferstream/.
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
exec .venv/bin/python -m infra.local up "$@"
