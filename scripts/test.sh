#!/usr/bin/env bash
# The test suite: sets up .venv if needed, lints with ruff (pyproject.toml), then runs
# pytest on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
