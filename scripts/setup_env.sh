#!/usr/bin/env bash
# Creates (or reuses) ./.venv with allmrec-jax installed editable, CPU torch pinned.
# Idempotent: a stamp of setup.cfg + constraints.txt skips the pip step when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.allmrec_stamp
want=$(cat setup.cfg constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, from its pinned CPU build, so nothing later pulls the CUDA wheel.
  .venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
  echo "$want" > "$stamp"
fi
