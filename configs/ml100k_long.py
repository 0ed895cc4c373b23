"""The long stage-2 run on the embedded default: configs/ml100k.py's small-LLM variant with a
longer step budget, a validation curve, and 500 test users.

Run (resumable: rerun the same command after an interruption):
  python launch/train.py --config=configs/ml100k_long.py --workdir=runs/ml100k_long

Stage 0 and stage 1 are those of configs/ml100k.py (a finished runs/ml100k can be copied
into the new workdir to skip them). Stage 2 is configs/ml100k.py's (each deviation from the
paper named in its docstring) with:
  stage2.max_steps = 1000          (configs/ml100k.py: 400; paper: 5 epochs of batch 4)
  stage2.eval_every = 200          validation ranking of 200 seeded users (20 stored
                          candidates) in metrics.jsonl, TensorBoard and
                          stage2/learning_curve.png
  eval.max_users = 500             a seeded subset of the 943 test users (paper: up to 10,000)

On a CPU without AVX512-BF16 (e.g. AVX2-only) "auto" matmul operands stay float32 (bfloat16
operands measured 39 vs 60 GFLOP/s there at SmolLM2's shapes).
"""

from configs import ml100k


def get_config():
  c = ml100k.get_config()
  c.stage2.max_steps = 1000            # CPU budget (paper: 5 epochs at batch 4)
  c.stage2.eval_every = 200
  c.stage2.eval_users = 200
  c.stage2.ckpt_every = 100
  c.eval.max_users = 500               # CPU budget: seeded subset of the 943 test users
  return c
