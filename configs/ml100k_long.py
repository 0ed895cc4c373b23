"""The long stage-2 run on the embedded default: the settings the stage-2 experiments favour.

Run (resumable: rerun the same command after an interruption):
  python launch/train.py --config=configs/ml100k_long.py --workdir=runs/ml100k_long

Stage 0 and stage 1 are those of configs/ml100k.py (a finished runs/ml100k can be copied
into the new workdir to skip them). Stage 2 differs from the paper (configs/base.py) in
these named settings, each a CPU-budget or small-LLM deviation (docs/results.md gives the
experiments behind them):
  stage2.item_slot = "in_quotes"   (paper: after_title)  `"[C]title"`: each title directly
                          follows its own item token
  stage2.user_at_answer = True     (paper: False)  the answer opens `... is "[U]`, so the
                          frozen LM's copy heads can match [U] to a candidate's [C] and
                          copy the title after it
  stage2.item_standardize = True   (paper: False)  F_I's input columns standardised over the
                          items: the stage-1 joint codes sit in a band of std 0.033 around
                          0.5 (item-item cosine 0.996), so untrained F_I gives every item
                          nearly the same token; an affine map F_I's first Linear could
                          learn, so the function class stays the paper's
  stage2.num_candidates = 5, stage2.num_history = 3  (paper: 20 / 10) shorter TRAINING
                          prompts (evaluation keeps the 20 stored candidates and 10 history
                          items): ~3x more steps per hour here
  stage2.positions_per_user = 4    (paper: 1)  the 4 last training items of each user are
                          targets (3,772 examples instead of 943)
  stage2.user_match_weight = 1.0, user_match_negatives = "catalog", user_match_batch = 64
                          (paper: LM loss only)  the catalog InfoNCE between F_U(x_u) and
                          F_I(e) with 64 extra examples per step: the projectors learn the
                          collaborative match directly
  stage2.train_lora = True         (paper: the LLM frozen)  LoRA rank 8 on q and v
                          (config.llm.lora_*) trained with the projectors: the small LLM
                          learns to read the [U]/[C] match (docs/results.md, section 7)
  stage2.max_steps = 400, num_epochs = 100 (paper: 5 epochs of batch 2)  a step budget
                          (~25 min of training on a 2-core CPU)
  stage2.lr = 1e-3                 (paper: 1e-4)
  stage2.eval_every = 200          validation ranking of 100 seeded users (20 stored
                          candidates) in metrics.jsonl, TensorBoard and
                          stage2/learning_curve.png
  eval.max_users = 500             a seeded subset of the 943 test users (paper: up to 10,000)
  eval.baselines = cf,popularity,llm_only   MLP-LLM would train stage 2 a second time
  eval.diagnostics = user_shuffled the x_u-shuffle ranking (the item-permutation one is a
                          third pass this budget leaves out)

On a CPU without AVX512-BF16 (e.g. AVX2-only), bfloat16 matmul operands are slower than
float32 (measured 39 vs 60 GFLOP/s at SmolLM2's shapes): add --config.llm.matmul_dtype=
"""

from configs import ml100k


def get_config():
  c = ml100k.get_config()
  c.stage2.item_slot = "in_quotes"     # small-LLM deviation (paper: after_title)
  c.stage2.user_at_answer = True       # small-LLM deviation (paper: False)
  c.stage2.item_standardize = True     # conditioning of F_I's input (paper: False)
  c.stage2.num_candidates = 5          # CPU budget, training prompts only (paper: 20)
  c.stage2.num_history = 3             # CPU budget, training prompts only (paper: 10)
  c.stage2.positions_per_user = 4      # more examples per user (paper: 1)
  c.stage2.user_match_weight = 1.0     # beyond the paper: the catalog match term
  c.stage2.user_match_negatives = "catalog"
  c.stage2.user_match_batch = 64
  c.stage2.train_lora = True           # small-LLM variant (paper: frozen LLM)
  c.stage2.num_epochs = 100            # bounded by max_steps
  c.stage2.max_steps = 400             # CPU budget (paper: 5 epochs at batch 2)
  c.stage2.lr = 1e-3                   # (paper: 1e-4)
  c.stage2.eval_every = 200
  c.stage2.eval_users = 100
  c.stage2.ckpt_every = 100
  c.eval.max_users = 500               # CPU budget: seeded subset of the 943 test users
  c.eval.baselines = "cf,popularity,llm_only"
  c.eval.diagnostics = "user_shuffled"
  return c
