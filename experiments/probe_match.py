r"""How well can F_U / F_I alone carry the collaborative signal? An LLM-free probe.

  .venv/bin/python -m experiments.probe_match --config=configs/ml100k_long.py --workdir=runs/ml100k \
      [--negatives=catalog|prompt] [--batch=64] [--steps=500] [--temperature=0.1]

Trains fresh stage-2 projectors with the match term of `stage2.user_match_weight` only
(`trainers/stage2.user_match_loss`: InfoNCE of cos(F_U(x_u), F_I(e)) / T, target positive;
catalog = every item as a negative, prompt = `stage2.num_candidates` - 1 sampled negatives)
on the stage-2 training examples (x_u from the frozen CF model, F_I fed the configured item
table), and ranks the 20 stored validation candidates of --eval_users seeded users by that
cosine — no prompt, no LLM. This bounds what the `[U]`/`[C]` match can give the LLM to copy
from, at a cost of seconds. Reads the finished cf/ and stage1/ of WORKDIR; trains with the
product's training loop (trainers/loop.run, in a scratch folder deleted at the end), the
ranking as its evaluation; prints one JSON line per evaluation.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
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
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.trainers import steps as steps_lib
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
flags.DEFINE_integer("eval_every", 100, "steps between rankings (0 = before and after "
                     "only)")
flags.DEFINE_string("projectors_from", "", "a stage-2 checkpoint folder (e.g. WORKDIR/stage2/"
                    "ckpt): start from its latest projectors instead of fresh ones; with "
                    "--steps=0 this ranks a trained run's [U]/[C] match without the LLM")


class RandomBatches:
  """Batches of `size` of `num` training examples, drawn without replacement by one seeded
  generator, step after step: `make_batch(rows, step)`. Resumable (its state is the
  generator's)."""

  def __init__(self, make_batch, num: int, size: int, seed: int):
    self._make, self._num, self._size = make_batch, num, size
    self._rng, self._step = np.random.default_rng(seed), 0

  def __iter__(self):
    return self

  def __next__(self):
    self._step += 1
    return self._make(self._rng.choice(self._num, self._size, replace=False), self._step)

  def get_state(self) -> dict:
    return {"step": self._step, "rng": self._rng.bit_generator.state}

  def set_state(self, state: dict) -> None:
    self._step = int(state["step"])
    self._rng.bit_generator.state = state["rng"]


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

  last_loss = [None]          # the latest step's loss (a device scalar)

  def evaluate(p, step):
    """The loop's evaluation: the ranking by cosine, printed as one JSON line."""
    s = np.asarray(rank_scores(p))
    rank = (s > s[:, :1]).sum(1)
    m = {"hit@1": round(float((rank == 0).mean()), 4),
         "hit@5": round(float((rank < 5).mean()), 4),
         "mrr": round(float((1.0 / (rank + 1)).mean()), 4)}
    loss = None if last_loss[0] is None else round(float(last_loss[0]), 4)
    print(json.dumps({"step": step, "loss": loss, **m,
                      "seconds": round(time.time() - t0, 1)}), flush=True)
    return {f"val/{k}": v for k, v in m.items()}

  @jax.jit
  def train_step(state, batch):
    p, o = state["params"], state["opt_state"]
    loss, g = jax.value_and_grad(lambda q: stage2_lib.user_match_loss(
        q, item_table, batch, projectors=proj, temperature=FLAGS.temperature,
        negatives=FLAGS.negatives))(p)
    updates, o = opt.update(g, o, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
    return steps_lib.new_state(p, o, state["step"] + 1), {"train/loss": loss}

  def step_fn(state, batch):
    state, metrics = train_step(state, batch)
    last_loss[0] = metrics["train/loss"]
    return state, metrics

  index = pipelines.train_exclusion_index(ds) if FLAGS.negatives == "prompt" else None

  def make_batch(sel, step):
    batch = {"user_rep": jnp.asarray(user_rep[sel]),
             "target_item": jnp.asarray(ex.targets[sel])}
    if FLAGS.negatives == "prompt":
      batch["cand_items"] = jnp.asarray(stage2_lib.sample_candidates(
          ds, index, ex.users[sel], ex.targets[sel], sel, cfg.num_candidates, config.seed,
          step))
    return batch

  print(json.dumps({"negatives": FLAGS.negatives, "batch": FLAGS.batch,
                    "temperature": FLAGS.temperature, "lr": cfg.lr,
                    "item_source": cfg.item_source,
                    "item_standardize": bool(cfg.item_standardize),
                    "examples": int(ex.users.size), "eval_users": len(es.users),
                    "projectors_from": FLAGS.projectors_from}), flush=True)
  state = steps_lib.new_state(jax.device_put(params), jax.device_put(opt_state))
  eval_every = FLAGS.eval_every or max(FLAGS.steps, 1)
  with tempfile.TemporaryDirectory(prefix="probe_match_") as scratch:
    loop_lib.run(scratch, name="probe_match", state=state, step_fn=step_fn,
                 data=RandomBatches(make_batch, ex.users.size, FLAGS.batch, config.seed),
                 total=FLAGS.steps, ckpt_every=max(FLAGS.steps, 1),
                 manager=checkpointing.make_manager(pathlib.Path(scratch) / "ckpt"),
                 log_every=eval_every, evaluate=evaluate, eval_every=eval_every,
                 eval_at_start=True, progress=False)


if __name__ == "__main__":
  app.run(main)
