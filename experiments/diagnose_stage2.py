r"""Does a trained stage 2 use its soft tokens? LM loss with the true vs shuffled inputs.

  .venv/bin/python -m experiments.diagnose_stage2 --config=configs/ml100k.py --workdir=runs/ml100k
      [--batches=25] [--name=stage2|stage2_mlp_llm] [--config.stage2.num_epochs=3 ...]

Restores the finished run in WORKDIR (CF, stage-1 tables, the stage-2 projectors named
--name: A-LLMRec on config.stage2.item_source, or MLP-LLM on the CF table; pass the run's
own --config.* overrides: an unfinished checkpoint is an error, never trained further), builds --batches batches of training prompts with fresh
candidates (epoch 1000), and prints the mean target-title loss (the training loss, per
token) for:
  true             the inputs the model was trained with;
  user_shuffled    each prompt gets another prompt's user representation x_u;
  items_shuffled   every item's embedding row is swapped for another item's (a fixed
                   random permutation of the F_I input table): each [HistoryEmb] /
                   [CandidateEmb] slot carries a wrong item's collaborative knowledge.
If the model chose its answer from the collaborative signal, the shuffled losses would be
clearly higher than the true one. Prints one JSON line.
"""

from __future__ import annotations

import json
import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax.data import prepare
from allmrec_jax.data import pipelines
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import stage2_run
from allmrec_jax.trainers import variants as variants_lib
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.weights import llm as llm_weights

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a finished run's workdir", required=True)
config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)
flags.DEFINE_string("name", "stage2", "stage-2 run to restore (stage2 | stage2_mlp_llm)")
flags.DEFINE_integer("batches", 25, "batches of training prompts to average over")


def main(argv):
  del argv
  config = FLAGS.config
  if config is None:
    raise SystemExit("--config is required (the run's config file)")
  workdir = pathlib.Path(FLAGS.workdir)
  if not (workdir / FLAGS.name / "ckpt").is_dir():
    raise SystemExit(f"--workdir={workdir}: no {FLAGS.name}/ckpt there")
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
  cf_vars = {"params": cf_params}
  tables = item_tables_lib.item_tables(config, workdir, ds, cf_model, cf_vars)
  source = "cf" if FLAGS.name == "stage2_mlp_llm" else config.stage2.item_source
  table = item_tables_lib.item_table_for(
      source, tables, config.seed,
      standardize=config.stage2.item_standardize)
  loaded = llm_weights.load_llm(config.llm.path or None, dtype=config.llm.dtype,
                                remat=config.llm.remat,
                                matmul_dtype=config.llm.matmul_dtype or "")
  llm, llm_params = loaded.module, {"params": loaded.params}
  builder = stage2_run.prompt_builder(ds, loaded.tokenizer, config.stage2)
  rep_fn = lambda seq: stage2_lib.user_representations(cf_model, cf_vars, seq)
  variant = (variants_lib.configured(config.stage2) if FLAGS.name == "stage2" else
             next(v for v in variants_lib.VARIANTS.values() if v.folder == FLAGS.name))
  params = stage2_lib.train(config, workdir, ds, variant=variant, llm=llm,
                            llm_params=llm_params, builder=builder, user_rep_fn=rep_fn,
                            item_table=table, restore_only=True)
  ex = stage2_lib.training_examples(ds, maxlen=config.data.maxlen,
                                    num_history=config.stage2.num_history)
  user_rep = rep_fn(ex.seq)
  index = pipelines.train_exclusion_index(ds)
  proj = projectors_lib.Stage2Projectors(table.shape[1], user_rep.shape[1],
                                         loaded.config.embed_dim)
  loss_fn = jax.jit(lambda p, t, b: stage2_lib.lm_loss(p, llm_params, t, b, llm=llm,
                                                       projectors=proj)[0])
  perm = np.random.default_rng(0).permutation(table.shape[0] - 1) + 1
  shuffled_table = table.copy()
  shuffled_table[1:] = table[perm]
  it = stage2_lib.iterate_batches(ex, user_rep, builder, ds, index,
                                  batch_size=config.stage2.batch_size,
                                  num_candidates=config.stage2.num_candidates,
                                  seed=config.seed, epoch=1000)
  losses = {"true": [], "user_shuffled": [], "items_shuffled": []}
  for _, (_, arrays) in zip(range(FLAGS.batches), it):
    b = {k: jnp.asarray(v) for k, v in arrays.items()}
    losses["true"].append(float(loss_fn(params, table, b)))
    rolled = {**b, "user_rep": jnp.roll(b["user_rep"], 1, axis=0)}
    losses["user_shuffled"].append(float(loss_fn(params, table, rolled)))
    losses["items_shuffled"].append(float(loss_fn(params, shuffled_table, b)))
  out = {k: float(np.mean(v)) for k, v in losses.items()}
  out.update({f"{k}_sem": float(np.std(v) / np.sqrt(len(v))) for k, v in losses.items()})
  diffs = {k: np.asarray(losses[k]) - np.asarray(losses["true"])
           for k in ("user_shuffled", "items_shuffled")}
  out.update({f"{k}_minus_true": float(d.mean()) for k, d in diffs.items()})
  out.update({f"{k}_minus_true_sem": float(d.std() / np.sqrt(len(d))) for k, d in diffs.items()})
  out.update({"workdir": str(workdir), "name": FLAGS.name, "batches": FLAGS.batches})
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
