r"""How well can F_U / F_I alone carry the collaborative signal? An LLM-free probe.

  .venv/bin/python -m experiments.probe_match --config=configs/ml100k_long.py --workdir=runs/ml100k \
      [--negatives=catalog|prompt] [--batch=64] [--steps=500] [--temperature=0.1]

Trains fresh stage-2 projectors with the match term of `stage2.user_match_weight` only
(`trainers/stage2.user_match_loss`: InfoNCE of cos(F_U(x_u), F_I(e)) / T, target positive;
catalog = every item as a negative, prompt = `stage2.num_candidates` - 1 sampled negatives)
on the stage-2 training examples (x_u from the frozen CF model, F_I fed the configured item
table), and ranks the 20 stored validation candidates of --eval_users seeded users by that
cosine — no prompt, no LLM. This bounds what the `[U]`/`[C]` match can give the LLM to copy
from, at a cost of seconds. Reads the finished cf/ and stage1/ of WORKDIR; prints one JSON
line per evaluation.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from allmrec_jax import checkpointing
from allmrec_jax.data import pipelines
from allmrec_jax.data import prepare
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.weights import llm as llm_weights

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a run's workdir with finished cf/ and stage1/",
                    required=True)
config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)
flags.DEFINE_enum("negatives", "catalog", ["catalog", "prompt"], "the InfoNCE's negatives")
flags.DEFINE_integer("batch", 64, "training examples per step")
flags.DEFINE_integer("steps", 500, "steps")
flags.DEFINE_float("temperature", 0.1, "InfoNCE temperature")
flags.DEFINE_integer("eval_users", 300, "validation users ranked")
flags.DEFINE_integer("eval_every", 100, "steps between rankings")
flags.DEFINE_string("projectors_from", "", "a stage-2 checkpoint folder (e.g. WORKDIR/stage2/"
                    "ckpt): start from its latest projectors instead of fresh ones; with "
                    "--steps=0 this ranks a trained run's [U]/[C] match without the LLM")


def main(argv):
  del argv
  config = FLAGS.config
  cfg = config.stage2
  t0 = time.time()
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, FLAGS.workdir, ds)
  cf_vars = {"params": cf_params}
  tables = item_tables_lib.item_tables(config, pathlib.Path(FLAGS.workdir), ds, cf_model, cf_vars)
  table = item_tables_lib.item_table_for(cfg.item_source, tables, config.seed,
                                        standardize=cfg.item_standardize)
  ex = stage2_lib.training_examples(ds, maxlen=config.data.maxlen, num_history=cfg.num_history,
                                    positions_per_user=cfg.positions_per_user)
  user_rep = stage2_lib.user_representations(cf_model, cf_vars, ex.seq)
  hidden = llm_weights.read_config(llm_weights.resolve_path(config.llm.path or None),
                                   config.llm.dtype)[0].embed_dim
  proj = projectors_lib.Stage2Projectors(table.shape[1], user_rep.shape[1], hidden)
  params = stage2_lib.init_projectors(proj, jax.random.PRNGKey(config.seed), table.shape[1],
                                      user_rep.shape[1])
  opt = stage2_lib.make_optimizer(cfg)
  opt_state = opt.init(params)
  if FLAGS.projectors_from:
    manager = checkpointing.make_manager(FLAGS.projectors_from, read_only=True)
    restored = checkpointing.restore(manager, abstract={"params": params,
                                                        "opt_state": opt_state})
    if restored is None:
      raise SystemExit(f"--projectors_from={FLAGS.projectors_from}: no checkpoint there")
    params = restored["params"]
  item_table = jnp.asarray(table)

  es = eval_lib.make_eval_set(ds, "valid", maxlen=config.data.maxlen,
                              num_history=config.eval.num_history, max_users=FLAGS.eval_users,
                              seed=config.data.candidate_seed)
  es_rep = jnp.asarray(stage2_lib.user_representations(cf_model, cf_vars, es.seq))
  cands = jnp.asarray(es.candidates)                # column 0 = the target

  @jax.jit
  def rank_scores(p):
    u = proj.apply(p, es_rep, method=proj.user)
    c = proj.apply(p, item_table[cands], method=proj.item)
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    c = c / jnp.linalg.norm(c, axis=-1, keepdims=True)
    return jnp.einsum("be,bce->bc", u, c)

  def evaluate(step, p, loss):
    s = np.asarray(rank_scores(p))
    rank = (s > s[:, :1]).sum(1)
    row = {"step": step, "loss": None if loss is None else round(loss, 4),
           "hit@1": round(float((rank == 0).mean()), 4),
           "hit@5": round(float((rank < 5).mean()), 4),
           "mrr": round(float((1.0 / (rank + 1)).mean()), 4),
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(row), flush=True)

  @jax.jit
  def step_fn(p, o, batch):
    loss, g = jax.value_and_grad(lambda q: stage2_lib.user_match_loss(
        q, item_table, batch, projectors=proj, temperature=FLAGS.temperature,
        negatives=FLAGS.negatives))(p)
    updates, o = opt.update(g, o, p)
    return jax.tree.map(lambda a, b: a + b, p, updates), o, loss

  print(json.dumps({"negatives": FLAGS.negatives, "batch": FLAGS.batch,
                    "temperature": FLAGS.temperature, "lr": cfg.lr,
                    "item_source": cfg.item_source,
                    "item_standardize": bool(cfg.item_standardize),
                    "examples": int(ex.users.size), "eval_users": len(es.users),
                    "projectors_from": FLAGS.projectors_from}), flush=True)
  evaluate(0, params, None)
  rng = np.random.default_rng(config.seed)
  index = pipelines.train_exclusion_index(ds) if FLAGS.negatives == "prompt" else None
  for step in range(1, FLAGS.steps + 1):
    sel = rng.choice(ex.users.size, FLAGS.batch, replace=False)
    batch = {"user_rep": jnp.asarray(user_rep[sel]),
             "target_item": jnp.asarray(ex.targets[sel])}
    if FLAGS.negatives == "prompt":
      batch["cand_items"] = jnp.asarray(stage2_lib.sample_candidates(
          ds, index, ex.users[sel], ex.targets[sel], sel, cfg.num_candidates, config.seed,
          step))
    params, opt_state, loss = step_fn(params, opt_state, batch)
    if step % FLAGS.eval_every == 0 or step == FLAGS.steps:
      evaluate(step, params, float(loss))


if __name__ == "__main__":
  app.run(main)
