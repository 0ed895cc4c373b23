#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv, fetches the pinned offline assets,
# prepares MovieLens-100K, then CF -> stage 1 -> stage 2 -> evaluation with
# SmolLM2-135M-Instruct and all-MiniLM-L6-v2. Rerunning skips/resumes finished stages.
# Extra arguments go to launch/train.py (e.g. --config.stage2.max_steps=20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python launch/train.py --config=configs/ml100k.py \
  --workdir="${WORKDIR:-runs/ml100k}" "$@"
