"""Shared defaults of every allmrec-jax config (the paper's values).

Not run directly: dataset configs (`configs/ml100k.py`, `configs/amazon.py`) start from
`get_base_config()` and override what differs. Every field carries a comment.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # global seed: init, shuffles, negatives, candidates
  c.stages = "cf,stage1,stage2"   # comma list of stages to run (finished ones are skipped)
  c.asset_cache_dir = ""          # offline asset cache ("" = $ALLMREC_CACHE or ~/.cache/allmrec_jax)

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "ml-100k"      # "ml-100k" | "amazon2018:DIR:Category" | "amazon2023:DIR:Category" | "atomic:DIR:name"
  c.data.path = ""                # local path of the raw data ("" = the embedded asset)
  c.data.data_dir = "~/.cache/allmrec_jax/processed"  # where processed datasets are written
  c.data.min_count = 5            # single-pass >=k filter on raw user/item counts (paper code)
  c.data.iterative_kcore = False  # True = iterate the filter to a fixed point (not the paper)
  c.data.rating_threshold = 0.0   # keep interactions with rating >= this (Beauty/Toys: 3)
  c.data.strict = False           # True = stop at the first bad line, duplicates too (file:line)
  c.data.candidate_seed = 2024    # seed of the stored 19/100-negative evaluation sets
  c.data.maxlen = 50              # CF sequence length (SASRec maxlen)
  c.data.description_mode = "first"  # Amazon descriptions: "first" entry (paper) | "join" all
  c.data.skip_unknown_items = True   # skip + count reviews of items absent from the metadata
  c.data.num_cold_users = 100     # MovieLens cold-user scenario: held-out users (seeded)
  c.data.cold_fraction = 0.35     # cold/warm items: bottom/top fraction by interaction count
                                  #   (the CF and stage-1 test breakdowns; paper: 35%)
  c.data.prefetch = 16            # grain read-ahead (batches) of the input pipelines; 0 = none

  # ---------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)       # (data, fsdp, tensor); -1 = the remaining devices (an
                                  # explicit shape may use the first few of one process)
  c.mesh.logical_axis_rules = None  # None = allmrec_jax.sharding.DEFAULT_RULES

  # ---------------------------------------------------------------- stage 0: CF
  c.cf = ml_collections.ConfigDict()
  c.cf.model = "sasrec"           # sasrec | ncf | gru4rec | nextitnet
  c.cf.hidden_dim = 50            # d
  c.cf.num_blocks = 2             # SASRec blocks
  c.cf.num_heads = 1              # SASRec heads
  c.cf.dropout = 0.5              # dropout rate
  c.cf.lr = 1e-3                  # Adam learning rate
  c.cf.b1 = 0.9                   # Adam beta1
  c.cf.b2 = 0.98                  # Adam beta2
  c.cf.batch_size = 128           # sequences per step
  c.cf.num_epochs = 200           # upper bound; early stopping on validation
  c.cf.eval_every = 20            # epochs between validation passes
  c.cf.ckpt_every = 5             # epochs between checkpoints (also at every validation pass)
  c.cf.patience = 3               # validation passes without improvement before stopping
  c.cf.select_metric = "valid/ndcg@10_neg100"  # checkpoint-selection metric
  c.cf.loss = "bce"               # bce (SASRec: pos label 1, one sampled neg label 0) | bpr
  c.cf.maxlen = c.data.get_ref("maxlen")  # = data.maxlen (positions table of SASRec)
  c.cf.conv_blocks = 5            # NextItNet residual blocks (RecBole default)
  c.cf.dilations = (1, 4)         # NextItNet dilation cycle; a block uses d then 2d
  c.cf.kernel_size = 3            # NextItNet causal conv width
  c.cf.mlp_layers = 2             # NCF MLP tower depth (2D -> D -> D/2)
  c.cf.drop_remainder = False     # False: last batch of an epoch padded (SASRec: 8 batches on ML-100K)
  c.cf.grad_clip = 0.0            # global-norm gradient clipping (0 = off, as in SASRec)
  c.cf.grad_splits = 1            # gradient as a weighted sum over this many row blocks of
                                  #   the batch (same objective; each block its own dropout
                                  #   key); >1 lets XLA:CPU run the blocks side by side
  c.cf.eval_batch_size = 256      # users per jitted evaluation chunk
  c.cf.progress = True            # tqdm progress bar over epochs

  # ---------------------------------------------------------------- SBERT
  c.sbert = ml_collections.ConfigDict()
  c.sbert.path = ""               # sentence-transformers dir ("" = embedded all-MiniLM-L6-v2)
  c.sbert.max_len = 64            # token length of the padded item-text table (trimmed to
                                  #   the longest item text, rounded up to 8, when shorter)
  c.sbert.dtype = "float32"       # SBERT compute/param dtype
  c.sbert.matmul_dtype = ""       # "" = dtype (paper: float32 throughout); "bfloat16" =
                                  #   dense-layer matmul operands in bfloat16 with float32
                                  #   accumulation, weights/Adam/LN/softmax in float32
                                  #   (mixed precision; ~1.4x the fine-tuned stage-1 step
                                  #   on an AVX512-BF16 CPU)
  c.sbert.normalize = "auto"      # final L2 normalisation: "auto" = as modules.json says;
                                  #   "false" = raw pooled embedding (the paper's SBERT,
                                  #   nq-distilbert-base-v1, has none); "true" = force it

  # ---------------------------------------------------------------- LLM
  c.llm = ml_collections.ConfigDict()
  c.llm.path = ""                 # HF dir or .gguf ("" = embedded SmolLM2-135M-Instruct)
  c.llm.dtype = "float32"         # compute/param dtype (bfloat16 on accelerators)
  c.llm.remat = False             # rematerialise each decoder layer in stage-2 training
  c.llm.matmul_dtype = ""         # "" = dtype; "bfloat16" = dense/LM-head matmul operands in
                                  #   bfloat16 with float32 accumulation (weights, norms,
                                  #   softmax float32). The authors' code runs OPT-6.7B in
                                  #   float16; "" keeps this port's float32 parity default
  c.llm.lora_rank = 8             # LoRA adapter shape for the trainers that train adapters
  c.llm.lora_alpha = 16.0         #   (stage2.train_lora; TALLRec's rank 8, alpha 16 on q, v);
  c.llm.lora_targets = "q,v"      #   comma-separated of the attention's q, k, v, o and the
                                  #   MLP's gate, up, down (Llama family) or fc1, fc2 (OPT).
                                  #   The frozen LLM ignores them

  # ---------------------------------------------------------------- stage 1
  c.stage1 = ml_collections.ConfigDict()
  c.stage1.latent_dim = 128       # joint collaborative-text embedding width
  c.stage1.lr = 1e-4              # Adam learning rate
  c.stage1.b1 = 0.9               # Adam beta1
  c.stage1.b2 = 0.98              # Adam beta2
  c.stage1.batch_size = 60        # users per step
  c.stage1.num_epochs = 10        # passes over the users
  c.stage1.freeze_sbert = False   # the paper's "Freeze SBERT" ablation
  c.stage1.w_rec = 1.0            # recommendation loss weight
  c.stage1.w_match = 1.0          # matching loss weight
  c.stage1.w_item_recon = 0.5     # item reconstruction loss weight
  c.stage1.w_text_recon = 0.2     # text reconstruction loss weight
  c.stage1.sbert_dropout = True   # SBERT in train mode (dropout) while fine-tuned, as the paper
  c.stage1.max_steps = 0          # >0 stops after this many global steps (smoke runs)
  c.stage1.checkpoint_every = 0   # steps between checkpoints (0 = at the end of each epoch)
  c.stage1.log_every = 1          # steps between metrics.jsonl / TensorBoard records
  c.stage1.eval_batch_size = 256  # items / users per batch when computing alignment metrics
  c.stage1.text_standardize = False  # feed (Q - mean) / std to f_T (per dimension, stats of
                                  #   the pretrained SBERT over all items, computed once)
  c.stage1.pack_texts = True      # pack several short item texts per SBERT row (same
                                  #   embeddings, far fewer padded tokens); False = one per row
  c.stage1.compact_vocab = True   # Adam over the word-embedding rows the item texts use
                                  #   (exactly dense Adam: other rows never get a gradient);
                                  #   False = dense [vocab, t] gradient and Adam state

  # ---------------------------------------------------------------- stage 2
  c.stage2 = ml_collections.ConfigDict()
  c.stage2.lr = 1e-4              # Adam learning rate of the projectors
  c.stage2.b1 = 0.9               # Adam beta1
  c.stage2.b2 = 0.98              # Adam beta2
  c.stage2.batch_size = 4         # prompts per step
  c.stage2.num_epochs = 5         # passes over the training examples (see max_steps)
  c.stage2.num_history = 10       # history items in TRAINING prompts (evaluation: eval.num_history)
  c.stage2.num_candidates = 20    # candidates in TRAINING prompts (target + negatives;
                                  #   evaluation always shows the 20 stored candidates)
  c.stage2.positions_per_user = 1 # target positions per user (1 = the paper: last training item)
  c.stage2.max_steps = 0          # stop after this many steps (0 = num_epochs epochs)
  c.stage2.max_title_tokens = 32  # titles are cut to this many tokens (counted)
  c.stage2.len_bucket = 32        # prompt lengths are padded to a multiple of this
  c.stage2.bos = "first"          # first | after_user | none. first: a fixed first token, then
                                  #   [U] (position 0 of a causal LM is an attention sink whose
                                  #   content is not read; measured on SmolLM2). after_user: the
                                  #   authors' exact order, [U] then OPT's </s>. none: [U] first.
  c.stage2.first_token = ""       # the fixed first token ("" = the tokenizer's BOS)
  c.stage2.item_slot = "after_title"  # after_title: "title"[C] (paper) | in_quotes: "[C]title"
  c.stage2.user_at_answer = False # True (needs in_quotes): the answer opens `is "[U]`, so a
                                  #   frozen LM's copy heads can match [U] to a candidate's [C]
  c.stage2.eval_every = 0         # steps between validation rankings (0 = none)
  c.stage2.eval_users = 200       # validation users ranked every eval_every steps
  c.stage2.log_every = 10         # steps between metric lines
  c.stage2.ckpt_every = 100       # steps between checkpoints (and at every epoch end)
  c.stage2.item_source = "joint"  # F_I input: joint (paper) | text (A-LLMRec SBERT) | cf (MLP-LLM) | random
  c.stage2.item_standardize = False  # True: F_I's input table standardised per column over the
                                  #   items (an affine map F_I's first Linear can represent; the
                                  #   paper feeds the raw sigmoid codes, which on ML-100K sit in a
                                  #   band of std 0.033 so that F_I starts with near-identical
                                  #   item tokens; docs/results.md)
  c.stage2.user_match_weight = 0.0   # > 0 adds w x InfoNCE(cos(F_U(x_u), F_I(candidates)) / T)
                                  #   with the target as the positive (beyond the paper, whose
                                  #   stage 2 trains with the LM loss only; docs/results.md)
  c.stage2.user_match_temperature = 0.1  # T of that InfoNCE
  c.stage2.user_match_negatives = "prompt"  # its negatives: prompt (the prompt's other
                                  #   candidates) | catalog (every item: a full-softmax loss)
  c.stage2.user_match_batch = 0   # extra training examples per step in that InfoNCE (catalog
                                  #   negatives only): x_u rows without a prompt or an LLM pass
  c.stage2.train_lora = False     # True: LoRA adapters (config.llm.lora_*) on the LLM trained
                                  #   with the projectors, same optimizer (beyond the paper,
                                  #   whose LLM stays frozen: a small-LLM variant;
                                  #   docs/results.md)
  c.stage2.use_user = True        # False = the "w/o user representation" ablation
  c.stage2.use_items = True       # False = the "w/o joint embeddings" ablation
  # Training options beyond the paper (trainers/stage2_options.py); defaults = the paper.
  c.stage2.schedule = "constant"  # lr schedule: constant (paper) | warmup_cosine: linear from 0
                                  #   over warmup_frac of the updates, cosine to 0 at the last
  c.stage2.warmup_frac = 0.05     # warmup share of warmup_cosine
  c.stage2.grad_accum = 1         # k > 1: one Adam update per k micro-batches (their mean
                                  #   gradient: k x batch_size per update); steps, logs and
                                  #   checkpoints count micro-batches
  c.stage2.curriculum = "none"    # none (paper) | linear: LLaRA's curriculum, step i uses the
                                  #   soft-token prompt with probability min(1, i / (curriculum_frac
                                  #   x steps)), else the text-only one (needs train_lora)
  c.stage2.curriculum_frac = 1.0  # share of the steps after which every prompt has soft tokens
  c.stage2.two_step_steps = 0     # N > 0: CoLLM's order, the first N steps train only LoRA on
                                  #   text-only prompts, then LoRA freezes and the projectors
                                  #   train on soft-token prompts (needs train_lora)
  c.stage2.history_drop = 0.0     # p > 0: each training prompt lists no history items with
                                  #   probability p (a seeded draw per example and epoch), so
                                  #   the answer must read the user from [UserRep] alone
  c.stage2.history_drop_unit = "example"  # "batch": one draw per batch, so that a dropped
                                  #   batch is short (its prompts are padded to one width)

  # ---------------------------------------------------------------- evaluation
  c.eval = ml_collections.ConfigDict()
  c.eval.max_users = 10000        # paper: up to 10,000 test users
  c.eval.num_history = 10         # history items in evaluation prompts (paper: 10)
  c.eval.max_new_tokens = 64      # generation length
  c.eval.repetition_penalty = 1.5 # paper's generation setting
  c.eval.split = "test"           # which target to evaluate (valid | test)
  c.eval.batch_size = 8           # users per LLM evaluation batch
  c.eval.baselines = "cf,llm_only,mlp_llm"  # baselines scored on the same users/candidates
  c.eval.num_examples = 5         # users whose prompt/answer go into results.md
  c.eval.genre_users = 0          # > 0: the paper's genre question for this many test users
                                  #   (A-LLMRec, LLM-Only and the history's top-3 genres),
                                  #   scored by genre precision / recall (allmrec_jax/genre.py)
  c.eval.diagnostics = "user_shuffled,items_permuted"  # extra rankings of A-LLMRec with x_u
                                  #   shuffled across users / item tokens permuted ("" = none)
  return c


def run_config(workdir) -> tuple[ml_collections.ConfigDict, list[str]]:
  """(config, dropped): the config a run folder was trained with, `workdir/config.json`
  over these defaults. A field the run's (older) code did not have keeps its default; the
  fields this code no longer has are ignored and listed in `dropped`."""
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(workdir).expanduser() / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (not a run folder of launch/train.py)")
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: unreadable ({e})") from None
  c = get_base_config()
  dropped = []

  def overlay(dst, src, prefix):
    for k, v in src.items():
      if k not in dst:
        dropped.append(prefix + k)
      elif isinstance(v, dict) and isinstance(dst[k], ml_collections.ConfigDict):
        overlay(dst[k], v, f"{prefix}{k}.")
      else:
        cur = dst[k]
        dst[k] = type(cur)(v) if isinstance(cur, (tuple, list)) and v is not None else v

  overlay(c, saved, "")
  return c, dropped


def field_help() -> str:
  """Every field of the base config with its default and its comment above (read from this
  file's source), one line each: the `--config` flag's help of the launchers."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  lines, field = [], None
  for line in pathlib.Path(__file__).read_text().splitlines():
    m = re.match(r"\s*c\.([\w.]+) = (.*?)\s*(?:#\s*(.*))?$", line)
    if m and "ConfigDict()" not in m.group(2):
      field = m.group(1)
      lines.append(f"  --config.{field}={m.group(2)}  {m.group(3) or ''}".rstrip())
    elif field and re.match(r"\s+#\s{2,}", line):       # a comment's continuation line
      lines[-1] += " " + line.strip().lstrip("#").strip()
    else:
      field = None
  return "\n".join(lines)
