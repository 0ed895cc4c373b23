"""Embedded default (the main command): MovieLens-100K + all-MiniLM-L6-v2 +
SmolLM2-135M-Instruct, the small-LLM variant of A-LLMRec that learns on a 135M LLM.

Run (the README's first command does exactly this after setting up .venv):
  python launch/train.py --config=configs/ml100k.py --workdir=runs/ml100k

The paper's frozen layout (configs/ml100k_paper.py) stays at chance on a 135M LLM; this
config keeps the paper's method (CF -> stage 1 -> F_U / F_I soft tokens, LM loss on the
target title, the paper's 20-candidate / 10-history prompts in training and evaluation)
and adds the named small-LLM deviations below (paper values in configs/base.py). Stage 0
and stage 1 and their CPU-budget settings are those of configs/ml100k_paper.py.

  stage2.item_slot = "in_quotes"   (paper: after_title)  `"[C]title"`: each title directly
                          follows its own item token
  stage2.user_at_answer = True     (paper: False)  the answer opens `... is "[U]`, so the
                          LM's copy heads can match [U] to a candidate's [C] and copy the
                          title after it
  stage2.item_standardize = True   (paper: False)  F_I's input columns standardised over the
                          items (the joint codes sit in a band of std 0.033 around 0.5, so
                          an untrained F_I gives every item nearly the same token); an
                          affine map F_I's first Linear could learn: the paper's function
                          class
  stage2.positions_per_user = 4    (paper: 1)  the 4 last training items of each user are
                          targets (3,772 examples instead of 943)
  stage2.user_match_weight = 1.0, user_match_negatives = "catalog", user_match_batch = 64
                          (paper: LM loss only)  an InfoNCE between F_U(x_u) and F_I(e) over
                          the catalogue, with 64 extra x_u rows per step: the projectors
                          learn the collaborative match directly
  stage2.train_lora = True, llm.lora_targets = "q,k,v,o"  (paper: the LLM frozen)  LoRA
                          rank 8 on the attention projections, trained with the projectors:
                          the small LLM learns to read the [U]/[C] match
  stage2.history_drop = 0.5        (paper: 0)  half of the training prompts list no history,
                          so the answer has only [UserRep] to read the user from: without
                          it the LLM reads the user from the history tokens alone (shuffling
                          x_u cost 0.045-0.065 hit@1; docs/results.md)
  stage2.max_steps = 250, num_epochs = 100 (paper: 5 epochs of batch 4)  a step budget
                          (200 steps fell below the main command's hit@1 bar on seed 0)
  stage2.lr = 1e-3                 (paper: 1e-4)
  stage2.schedule = "warmup_cosine"  (paper: constant)  linear warmup over 5% of the steps,
                          then a cosine decay to 0 (LLaRA's schedule): +0.035 hit@1 on
                          both seeds over the constant rate (docs/results.md)
  eval.max_users = 200             a seeded subset of the 943 test users (paper: up to 10,000)
  eval.baselines = cf,popularity,llm_only   MLP-LLM would train stage 2 a second time
  eval.diagnostics = user_shuffled   rankings with another user's x_u: does the LLM read
                          the user? (add context_shuffled for another user's x_u and
                          history as well: 1.5 more minutes)

Measured (docs/results.md, 200 test users, fresh clone, setup included, a 2-core
AVX512-BF16 CPU): 250 steps, seeds 0 / 1: hit@1 0.305 / 0.300, generation 0.305 / 0.300,
0.145 / 0.120 with another user's x_u (drop 0.160 / 0.180), 23.1 / 23.1 min (SASRec 0.560 /
0.540, a popularity count 0.230, LLM-Only 0.045 / generation 0.035, chance 0.05). 200
steps: hit@1 0.245 / 0.315 (seed 0 below the bar); 300 steps: 0.365 / 0.310 (27.7 min
before the evaluation and LoRA speed-ups).
"""

from configs import ml100k_paper


def get_config():
  c = ml100k_paper.get_config()
  c.stage2.item_slot = "in_quotes"     # small-LLM deviation (paper: after_title)
  c.stage2.user_at_answer = True       # small-LLM deviation (paper: False)
  c.stage2.item_standardize = True     # conditioning of F_I's input (paper: False)
  c.stage2.positions_per_user = 4      # more examples per user (paper: 1)
  c.stage2.user_match_weight = 1.0     # beyond the paper: the catalog match term
  c.stage2.user_match_negatives = "catalog"
  c.stage2.user_match_batch = 64
  c.stage2.train_lora = True           # small-LLM variant (paper: frozen LLM)
  c.llm.lora_targets = "q,k,v,o"       # LoRA on every attention projection (base: q,v)
  c.stage2.history_drop = 0.5          # x_u must carry the user (paper: 0)
  c.stage2.num_epochs = 100            # bounded by max_steps
  c.stage2.max_steps = 250             # CPU budget (paper: 5 epochs at batch 4)
  c.stage2.lr = 1e-3                   # (paper: 1e-4)
  c.stage2.schedule = "warmup_cosine"  # (paper: constant)
  c.stage2.ckpt_every = 100
  c.eval.baselines = "cf,popularity,llm_only"
  c.eval.diagnostics = "user_shuffled"
  return c
