#!/usr/bin/env bash
# The test suite: unit tests, then integration tests on a private local stack that the tests
# start on free ports (broker, S3 server, tritonserver) beside the running PostgreSQL and Redis.
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
infra/triton/setup.sh
exec .venv/bin/python -m pytest "$@"
