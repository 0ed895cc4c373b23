#!/bin/bash
# The last device call of experiments/gpu_tables_bundle.sh: joins the stored parts and this
# call's part, checks the tar's sha256, installs the bundled wheels, and runs
# experiments/gpu_tables.py on the bundle's run folder for at most BUDGET seconds; then packs
# what the tables produced (parts' json/md, per-user evaluations, variants' metrics, no
# checkpoints) into $OUT/tables.tgz, which unpacks into the local run folder. Env: PARTS
# (comma list), BUDGET (s), USERS, CONFIG, STORE (where calls 1..n-1 put their parts),
# PY (python3), WHEELS=0 (use the installed packages).
# Flags given are passed on to gpu_tables.py (the run's --config.* overrides).
set -o pipefail
export PYTHONUNBUFFERED=1
STORE=${STORE:-$HOME/gstore}
OUT=${OUT:-/tmp/out}
T=${WORK:-/tmp/gpu_tables}
last=$(ls -d .gpu_t* | sort -V | tail -1)
mkdir -p "$T" "$OUT"
mkdir -p "$STORE" && cp "$last"/bundle.tar.* "$STORE/"
cat "$STORE"/bundle.tar.* > "$T/bundle.tar"
echo "$(cat "$last/bundle.sha256")  $T/bundle.tar" | sha256sum -c || exit 1
tar -xf "$T/bundle.tar" -C "$T" && rm "$T/bundle.tar"
PY=${PY:-python3}
if [ "${WHEELS:-1}" = 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$T"/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD ALLMREC_CACHE=$T/cache
"$PY" -c "import jax, flax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', \
flax.__version__, 'orbax', o.__version__, jax.devices())"
timeout "${BUDGET:-420}" "$PY" -m experiments.gpu_tables --config="${CONFIG:-configs/ml100k_long.py}" \
  --workdir="$T/run" --item_tables="$T/item_tables.npz" --compile_cache=/tmp/xla_cache \
  --users="${USERS:-100}" --parts="${PARTS:?comma list of parts}" "$@" > "$OUT/log.txt" 2>&1
echo "exit $?"
tr "\r" "\n" < "$OUT/log.txt" | grep -vE "it/s|s/it|step/s|s/step|checkpoint" | tail -40
(cd "$T/run" && find tables tables.md -name ckpt -prune -o -name tb -prune -o -type f -print \
   2>/dev/null | tar -czf "$OUT/tables.tgz" -T -)
ls -la "$OUT"
