"""Cross-domain: trained on one domain, asked about another without fine-tuning; the
target's items get their joint embedding from text."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from allmrec_jax import config_lib
from allmrec_jax.data import prepare
from allmrec_jax.data import scenarios
from allmrec_jax.paper_tables import common
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import stage1 as stage1_lib
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.trainers import stage2_run as stage2_run_lib
from allmrec_jax.trainers import variants as variants_lib

if TYPE_CHECKING:
  from allmrec_jax.paper_tables.suite import PaperTables

# x_u of the cross-domain target users: "none" (no user token: the source CF model has
# never seen a target item) or "decoded" (the source CF model over stage 1's
# reconstruction f_I^dec(f_T^enc(SBERT(text))) of the target's item embeddings).
CROSS_DOMAIN_USERS = ("none", "decoded")
# The models trained on the source domain (`variants.VARIANTS` keys), in row order.
CROSS_DOMAIN_MODELS = ("tallrec", "allmrec", "sbert")


def decoded_user_representations(config, cf_params, s1, text_joint: np.ndarray, ds,
                                 seq: np.ndarray) -> np.ndarray:
  """float32[X, D] x_u of histories `seq` over `ds`'s items, which the CF model (trained on
  another catalogue, `cf_params`) has never seen: its item table is replaced by stage 1's
  reconstruction f_I^dec(e) of their text-derived joint embeddings e = `text_joint`
  (float[N+1, latent], `item_tables.text_item_table`), row 0 (padding) kept at zero."""
  ae = s1.models.item_ae
  decoded = np.array(ae.apply({"params": s1.params["item_ae"]}, text_joint,
                              method=ae.decode), np.float32)
  decoded[0] = 0.0
  model = cf_lib.make_model(config, ds.num_items)
  params = dict(cf_params)
  params["item_emb"] = {**params["item_emb"], "embedding": decoded}
  return stage2_lib.user_representations(model, {"params": params}, seq)


def _datasets(suite: PaperTables):
  """(source run config, source workdir, source ds, target ds)."""
  if suite.cross_domain_target:
    target = common.overridden(suite.config, {"data.dataset": suite.cross_domain_target,
                                              "data.path": ""})
    return suite.config, suite.workdir, suite.ds, prepare.prepare_dataset(target.data)
  src, tgt = scenarios.cross_domain_split(suite.ds)
  wd = suite.prepare_variant("cross_domain", suite.config, src, ["cf", "stage1"])
  return suite.config, wd, src, tgt


def _target_run(suite: PaperTables, config, wd, src, tgt, es) -> stage2_run_lib.Stage2Run:
  """A Stage2Run over the cross-domain target: its titles and prompts, the source run's
  stage 1 applied to the target's item texts (standardised like the source's F_I input
  when configured); x_u per `cross_domain_user` (zeros with "none": the models then run
  without the user token)."""
  cf_model, cf_params = cf_lib.load_trained_cf(config, wd, src)
  cf_vars = {"params": cf_params}
  s1 = stage1_lib.load_trained_stage1(config, wd)
  text = item_tables_lib.text_item_table(s1, config, tgt)
  cfg = config_lib.Stage2Config.from_config(config)
  table = item_tables_lib.item_table_for("text", {"text": text}, config.seed,
                                         standardize=cfg.item_standardize)
  if suite.cross_domain_user == "decoded":
    user_rep = decoded_user_representations(config, cf_params, s1, text, tgt, es.seq)
  else:
    dim = stage2_lib.user_representations(
        cf_model, cf_vars, np.zeros((1, config.data.maxlen), np.int32)).shape[1]
    user_rep = np.zeros((len(es.users), dim), np.float32)
  return stage2_run_lib.Stage2Run(
      config, wd, tgt, cf_model=cf_model, cf_params=cf_vars, item_tables={"text": table},
      loaded=suite.loaded, es=es, user_rep=user_rep,
      eval_dir=suite.out / "eval" / "cross_domain", mesh=suite.mesh, rules=suite.rules)


def cross_domain(suite: PaperTables) -> dict:
  config, wd, src, tgt = _datasets(suite)
  ecfg = config.eval
  es = eval_lib.make_eval_set(tgt, ecfg.split, maxlen=config.data.maxlen,
                              num_history=ecfg.num_history, max_users=ecfg.max_users,
                              seed=config.data.candidate_seed)
  name = "cross_domain"
  src_run = lambda: suite.stage2_run("cross_domain_source", workdir=wd, ds=src)
  tgt_run = lambda: suite.cached_run(
      "cross_domain", lambda: _target_run(suite, config, wd, src, tgt, es))
  rows = [suite.popularity_row(tgt, es),
          suite.baseline_row(name, "llm_only", tgt_run)]
  use_user = suite.cross_domain_user != "none"
  suffix = "" if not use_user else f"_{suite.cross_domain_user}_user"
  for model in CROSS_DOMAIN_MODELS:
    variant = variants_lib.VARIANTS[model]
    key = model if variant.text_only else model + suffix

    def evaluate(run, variant=variant, key=key):
      params, _ = src_run().train_variant(variant)    # trained on the source domain
      scored = dataclasses.replace(variant, user="cf" if use_user else "none")
      ev = run.evaluator(scored, run.item_tables["text"])

      def score(_):
        r = ev.evaluate(params, es, run.user_rep,
                        desc=f"eval {variant.label} (cross-domain)")
        return r, eval_lib.llm_metrics(r, "")
      run.evaluated(key, variant.label, score)
    rows.append(suite.llm_row(name, key, variant.label, tgt_run, evaluate))
  table, records = common.metric_table(rows)
  user = ("no user token" if not use_user else
          "x_u is the source CF model over stage 1's text-decoded item embeddings")
  return {"title": f"Cross-domain: trained on {src.name}, asked about {tgt.name} "
                   f"({len(es.users)} users) without fine-tuning; the target's items get "
                   f"their joint embedding from text; {user}",
          "table": table, "rows": records}
