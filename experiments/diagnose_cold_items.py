r"""Why the stage-1 scoring paths rank cold items last: bug or learned popularity bias?

  .venv/bin/python -m experiments.diagnose_cold_items --config=configs/ml100k.py --workdir=runs/ml100k

Reads the finished CF and stage-1 checkpoints of WORKDIR (writes nothing there). For every
test user and every item it computes the scores of four paths: stage 1's
s(x_u, f_I^dec(e_i)) with e_i = f_T^enc(SBERT(text_i)) ("text", the A-LLMRec (SBERT) path)
and with e_i = f_I^enc(E_i) ("joint"), the CF model's own score ("cf_model") and the
training interaction count ("popularity"). It prints one JSON object with, per path:
  hit@1 / mean target rank on the 20 stored test candidates for cold-target and
    warm-target users (config.data.cold_fraction; the stage-1 metrics' groups);
  item_bias_spearman: Spearman correlation between an item's mean score over all test
    users and its log training count (1 = the path ranks items by popularity alone);
  user_share: the share of the score variance explained by the item mean (the rest is
    what depends on the user);
  and the same hit@1 after removing each item's mean score ("centred"), which keeps only
    the user-dependent part.
An experiment tool; experiments/NOTES.md quotes its run.
"""

from __future__ import annotations

import json
import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from allmrec_jax.data import prepare
from allmrec_jax.data import scenarios
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import stage1 as stage1_lib
from allmrec_jax.trainers import stage2 as stage2_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a run's workdir with finished cf/ and stage1/",
                    required=True)
config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
  ra = np.argsort(np.argsort(a)).astype(np.float64)
  rb = np.argsort(np.argsort(b)).astype(np.float64)
  return float(np.corrcoef(ra, rb)[0, 1])


def _target_ranks(scores: np.ndarray, cands: np.ndarray) -> np.ndarray:
  """0-based rank of column 0 among the candidates (ties pessimistic)."""
  s = np.take_along_axis(scores, cands, axis=1)
  return np.sum(s[:, 1:] >= s[:, :1], axis=1)


def main(argv):
  del argv
  config = FLAGS.config
  workdir = pathlib.Path(FLAGS.workdir)
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
  cf_vars = {"params": cf_params}
  cf_table = np.asarray(stage1_lib.cf_item_table(cf_model, cf_vars), np.float32)
  s1 = stage1_lib.load_trained_stage1(config, workdir, cf_dim=cf_table.shape[1])
  ids, mask = stage1_lib.item_text_table(ds, s1.tokenizer, config.sbert.max_len)
  e = stage1_lib.joint_item_embeddings(s1.models, s1.params, source="cf", item_table=cf_table)
  q = stage1_lib.joint_item_embeddings(s1.models, s1.params, source="text", text_ids=ids,
                                       text_mask=mask)
  ae = s1.models.item_ae
  dec = {k: np.asarray(ae.apply({"params": s1.params["item_ae"]}, v, method=ae.decode))
         for k, v in (("text", q), ("joint", e))}

  users = ds.eval_users("test")
  hist = ds.history_matrix("test", config.data.maxlen)[users]
  cands = ds.candidates("test")[users]
  x = stage2_lib.user_representations(cf_model, cf_vars, hist)        # [U, d]
  starts, ends = ds.train_bounds()
  counts = np.bincount(np.concatenate([ds.seq_items[s:t] for s, t in zip(starts, ends)]),
                       minlength=ds.num_items + 1).astype(np.float64)
  n = ds.num_items + 1
  scores = {k: (x @ v.T) / x.shape[1] for k, v in dec.items()}        # stage 1's mean product
  scores["cf_model"] = x @ cf_table.T      # SASRec's score: x_u . E_i (the rows the model uses)
  scores["popularity"] = np.broadcast_to(counts[None, :], (len(users), n)).copy()
  groups = scenarios.cold_warm_users(ds, "test", float(config.data.cold_fraction))
  sel = {"cold": np.isin(users, groups["cold"]), "warm": np.isin(users, groups["warm"])}
  logc = np.log1p(counts[1:])
  out = {"users": {g: int(m.sum()) for g, m in sel.items()}}
  for name, s in scores.items():
    s = s.copy()
    s[:, 0] = -np.inf
    r = _target_ranks(s, cands)
    row = {f"{g}/hit@1": float(np.mean(r[m] == 0)) for g, m in sel.items()}
    row.update({f"{g}/mean_rank": float(np.mean(r[m]) + 1) for g, m in sel.items()})
    item_mean = s[:, 1:].mean(axis=0)
    row["item_bias_spearman"] = _spearman(item_mean, logc)
    if name != "popularity":
      resid = s[:, 1:] - item_mean[None]
      total = s[:, 1:].var()
      row["user_share"] = float(resid.var() / total) if total > 0 else 0.0
      centred = s.copy()
      centred[:, 1:] = resid
      rc = _target_ranks(centred, cands)
      row.update({f"centred/{g}/hit@1": float(np.mean(rc[m] == 0)) for g, m in sel.items()})
    out[name] = {k: round(v, 4) for k, v in row.items()}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
