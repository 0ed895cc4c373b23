r"""Short stage-2 probes: can the frozen LLM learn to use a soft-token signal at all?

  .venv/bin/python -m experiments.probe_stage2 --config=configs/ml100k_paper.py --workdir=runs/ml100k_paper \
      --user=cf|oracle|none --items=joint|cf|text|random|marker|popularity [--steps=100] [--eval_users=80] \
      [--config.stage2.lr=1e-3 ...]

Reads the finished CF and stage-1 checkpoints of WORKDIR (never writes there), trains fresh
projectors for --steps steps of the configured stage 2 with the product's training loop
(trainers/loop.run, in a scratch folder deleted at the end) and ranks the 20 stored
validation candidates of --eval_users seeded users by likelihood (no generation) as the
loop's evaluation. Prints one JSON line {"before": ...} before training, one
{"step", "rank"} line every --eval_every steps, and one JSON line with hit@1 / hit@5 / mrr
before and after training.

--user=oracle replaces x_u by the CF item embedding of the example's own target (training
and evaluation): the answer is then written in the soft tokens, and what is measured is
whether the LLM can learn to read it from a [UserRep] / [CandidateEmb] match within the
budget. --user=none keeps the slot's token embedding (the "w/o user" ablation).
An experiment tool; experiments/NOTES.md quotes its runs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

from allmrec_jax import checkpointing
from allmrec_jax.data import prepare
from allmrec_jax.data import pipelines
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import stage2_run
from allmrec_jax.trainers import stage2 as stage2_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a script: tests import the module)."""
  flags.DEFINE_string("workdir", None, "a run's workdir with finished cf/ and stage1/",
                      required=True)
  config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)
  flags.DEFINE_enum("user", "cf", ["cf", "oracle", "tied", "none"],
                    "what the [UserRep] slot carries (tied: F_I of the target's item input, "
                    "an exact copy of the target's [CandidateEmb])")
  flags.DEFINE_enum("items", "joint",
                    ["joint", "cf", "text", "random", "marker", "popularity"],
                    "F_I input table (marker: the target's slots get [1, 0], others [0, 1]; "
                    "popularity: [z, 1], z = the standardised log training count)")
  flags.DEFINE_integer("steps", 100, "training steps")
  flags.DEFINE_integer("eval_users", 80, "validation users ranked before/after")
  flags.DEFINE_string("split", "valid", "evaluation split")
  flags.DEFINE_integer("eval_every", 0, "also rank every this many steps (0 = only at the "
                       "end)")


class TiedProjectors(projectors_lib.Stage2Projectors):
  """[U] := F_I(x): the user slot gets the item projector's output of its input."""

  def user(self, x):
    self.user_proj(jax.numpy.zeros((1, self.user_in_dim)))   # keep the params tree
    return self.item_proj(x)


class MarkedPrompts:
  """A PromptBuilder whose item slots holding the target point at `marker_row` (--items=
  marker). Training prompts name their targets; an evaluation prompt (no targets) is
  matched to its user's target by its candidate row (`eval_set`: candidates in prompt
  order, distinct per user)."""

  def __init__(self, builder, marker_row: int, eval_set: eval_lib.EvalSet):
    self._builder, self._marker_row = builder, marker_row
    self._targets = {self._key(row): int(t)
                     for row, t in zip(eval_set.prompt_candidates, eval_set.targets)}

  @staticmethod
  def _key(row) -> bytes:
    return np.asarray(row, np.int64).tobytes()

  def build(self, history, candidates, targets=None, **kw):
    pb = self._builder.build(history, candidates, targets, **kw)
    if candidates is None:
      return pb
    if targets is None:
      targets = [self._targets[self._key(row)] for row in candidates]
    hit = pb.item_ids == np.asarray(targets)[:, None]
    return dataclasses.replace(
        pb, item_ids=np.where(hit, self._marker_row, pb.item_ids).astype(np.int32))

  def __getattr__(self, name):       # continuations, slot ids, ...: the builder's
    return getattr(self._builder, name)


def main(argv):
  del argv
  config = FLAGS.config
  if config is None:
    raise SystemExit("--config is required")
  t0 = time.time()
  cfg = config.stage2
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, FLAGS.workdir, ds)
  cf_vars = {"params": cf_params}
  with config.unlocked():
    config.stage2.item_source = ("joint" if FLAGS.items in ("marker", "popularity")
                                  else FLAGS.items)
  tables = item_tables_lib.item_tables(config, pathlib.Path(FLAGS.workdir), ds, cf_model, cf_vars)
  marker = FLAGS.items == "marker"
  if marker:   # rows 1..N = "not the target", row N+1 = "the target" (remapped per prompt)
    n_rows = tables["cf"].shape[0]
    table = np.zeros((n_rows + 1, 2), np.float32)
    table[:n_rows, 1] = 1.0
    table[n_rows, 0] = 1.0
  elif FLAGS.items == "popularity":
    starts, ends = ds.train_bounds()
    counts = np.bincount(np.concatenate([ds.seq_items[s:e] for s, e in zip(starts, ends)]),
                         minlength=tables["cf"].shape[0]).astype(np.float64)
    logc = np.log1p(counts[1:])
    # [z, 1]: with a 1-column input the projector's LayerNorm would keep only sign(z).
    table = np.zeros((tables["cf"].shape[0], 2), np.float32)
    table[1:, 0] = (logc - logc.mean()) / logc.std()
    table[1:, 1] = 1.0
  else:
    table = item_tables_lib.item_table_for(FLAGS.items, tables, config.seed,
                                           standardize=cfg.item_standardize)
  cf_table = tables["cf"]
  loaded = stage2_run.load_llm(config)
  llm, llm_params = loaded.module, {"params": loaded.params}
  es = eval_lib.make_eval_set(ds, FLAGS.split, maxlen=config.data.maxlen,
                              num_history=config.eval.num_history, max_users=FLAGS.eval_users,
                              seed=config.data.candidate_seed)
  builder = stage2_run.prompt_builder(ds, loaded.tokenizer, cfg)
  if marker:
    builder = MarkedPrompts(builder, table.shape[0] - 1, es)

  ex = stage2_lib.training_examples(ds, maxlen=config.data.maxlen,
                                    num_history=cfg.num_history,
                                    positions_per_user=cfg.positions_per_user)
  n_batches = len(ex.users) // cfg.batch_size
  if n_batches == 0:
    raise SystemExit(f"{len(ex.users)} training examples < config.stage2.batch_size "
                     f"{cfg.batch_size}")
  if FLAGS.user == "oracle":
    user_rep = cf_table[ex.targets]
  elif FLAGS.user == "tied":
    user_rep = table[ex.targets]
  else:
    user_rep = stage2_lib.user_representations(cf_model, cf_vars, ex.seq)
  use_user = FLAGS.user != "none"
  proj_cls = TiedProjectors if FLAGS.user == "tied" else projectors_lib.Stage2Projectors
  proj = proj_cls(table.shape[1], user_rep.shape[1], loaded.config.embed_dim)
  trainer = stage2_lib.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj,
                                     item_table=table,
                                     optimizer=stage2_lib.make_optimizer(cfg),
                                     use_user=use_user,
                                     **stage2_lib.match_options(cfg, use_user))
  params0 = stage2_lib.init_projectors(proj, jax.random.PRNGKey(config.seed), table.shape[1],
                                       user_rep.shape[1])
  if cfg.train_lora:   # adapters trained with the projectors (boxed: sharded by logical axes)
    params0["lora"] = lora_lib.init_adapters(llm, llm_params, jax.random.PRNGKey(config.seed + 1))

  es_rep = (cf_table[es.targets] if FLAGS.user == "oracle"
            else table[es.targets] if FLAGS.user == "tied"
            else stage2_lib.user_representations(cf_model, cf_vars, es.seq))
  # One evaluator (one set of jitted functions) for every ranking; only the params change.
  ev = eval_lib.LLMEvaluator(llm=llm, llm_params=llm_params, tokenizer=loaded.tokenizer,
                             builder=builder, titles=ds.titles, projectors=proj,
                             item_table=table, use_user=use_user,
                             batch_size=config.eval.batch_size)

  out = {"user": FLAGS.user, "items": FLAGS.items, "steps": FLAGS.steps, "lr": cfg.lr,
         "bos": cfg.bos, "item_slot": cfg.item_slot, "user_at_answer": cfg.user_at_answer,
         "item_standardize": bool(cfg.item_standardize),
         "train_candidates": cfg.num_candidates, "train_history": cfg.num_history,
         "batch_size": cfg.batch_size, "positions_per_user": cfg.positions_per_user,
         "train_lora": bool(cfg.train_lora), "match_weight": float(cfg.user_match_weight),
         "eval_users": len(es.users), "split": FLAGS.split, "workdir": FLAGS.workdir}

  def evaluate(params, step):
    """The loop's evaluation: ranking hit@1 / hit@5 / mrr of `es` (printed, but the last)."""
    res = ev.evaluate(params, es, es_rep, generate=False, desc="rank")
    m = eval_lib.ranking_metrics(res["scores"], "")
    m = {k: round(m[k], 4) for k in ("hit@1", "hit@5", "mrr")}
    if step == 0:
      out["before"] = m
      print(json.dumps({"before": m}), flush=True)
    elif step < FLAGS.steps:
      print(json.dumps({"step": step, "rank": m}), flush=True)
    else:
      out["after"] = m
    return {f"val/{k}": v for k, v in m.items()}

  losses = []                  # every step's loss (device scalars, read at the end)

  def step_fn(state, arrays):
    state, metrics = trainer.step(state, arrays)
    losses.append(metrics["train/loss"])
    return state, metrics

  index = pipelines.train_exclusion_index(ds)

  def epoch_batches(epoch: int, start: int):
    for _, arrays in stage2_lib.iterate_batches(
        ex, user_rep, builder, ds, index, batch_size=cfg.batch_size,
        num_candidates=cfg.num_candidates, seed=config.seed, epoch=epoch, start_batch=start,
        match_batch=stage2_lib.match_batch(cfg, use_user)):
      yield arrays

  with tempfile.TemporaryDirectory(prefix="probe_stage2_") as scratch:
    loop_lib.run(scratch, name="probe_stage2", state=trainer.init_state(params0),
                 step_fn=step_fn, data=loop_lib.EpochBatches(epoch_batches, n_batches),
                 total=FLAGS.steps, ckpt_every=max(FLAGS.steps, 1),
                 manager=checkpointing.make_manager(pathlib.Path(scratch) / "ckpt"),
                 log_every=20, evaluate=evaluate,
                 eval_every=FLAGS.eval_every or max(FLAGS.steps, 1), eval_at_start=True)
  if losses:
    loss = np.asarray(jax.device_get(losses), np.float64)
    after = out.pop("after")
    out["loss_first20"] = round(float(np.mean(loss[:20])), 4)
    out["loss_last20"] = round(float(np.mean(loss[-20:])), 4)
    out["after"] = after
  out["seconds"] = round(time.time() - t0, 1)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
