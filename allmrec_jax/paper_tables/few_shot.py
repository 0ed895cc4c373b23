"""Few-shot: stage 2 (or every stage, `few_shot_scope="all"`) trained on K seeded users."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from allmrec_jax.data import scenarios
from allmrec_jax.paper_tables import common
from allmrec_jax.trainers import baselines as baselines_lib
from allmrec_jax.trainers import variants as variants_lib

if TYPE_CHECKING:
  from allmrec_jax.paper_tables.suite import PaperTables

FEW_SHOT_SCOPES = ("stage2", "all")
# The stage-2 models trained on the K users (`variants.VARIANTS` keys), in row order.
FEW_SHOT_MODELS = ("tallrec", "allmrec", "sbert")


def few_shot_rows(suite: PaperTables, k: int) -> list[common.Row]:
  seed = int(suite.config.seed)
  users = scenarios.few_shot_users(suite.ds, k, seed=seed)
  backbone = common.BACKBONES[suite.config.cf.model]
  if suite.few_shot_scope == "stage2":     # the run's CF model and stage 1, stage 2 on K
    name, train_users, rows = "base", users, []
    run_fn = lambda: suite.stage2_run("base")
  else:                                    # the paper's: every stage on the K users
    name, train_users = f"few_shot{k}_all", None
    ds_k = scenarios.subset_users(suite.ds, users, name=f"{suite.ds.name}-fewshot{k}-s{seed}")
    wd = suite.prepare_variant(name, suite.config, ds_k, ["cf", "stage1"])
    rows = [suite.trained_cf_row(f"{backbone} (K={k})", suite.config, wd, ds_k)]
    run_fn = lambda: suite.stage2_run(name, workdir=wd, ds=ds_k)
  for key in FEW_SHOT_MODELS:
    v = variants_lib.VARIANTS[key]
    variant = v.renamed(f"few_shot{k}_{key}", f"{v.label} K={k}",
                        folder=f"stage2_few_shot{k}_{key}")
    rows.append(suite.llm_row(
        name, variant.name, f"{v.label} (K={k})", run_fn,
        functools.partial(baselines_lib.evaluate_variant, variant=variant,
                          users=train_users)))
  return rows


def few_shot(suite: PaperTables) -> dict:
  backbone = common.BACKBONES[suite.config.cf.model]
  rows = [suite.cf_row(suite.config.cf.model, f"{backbone} (all users)")]
  for k in suite.few_shot_k:
    rows += few_shot_rows(suite, k)
  table, records = common.metric_table(rows)
  title = ("Few-shot: stage 2 trained on K seeded users (CF model and stage 1 of the run)"
           if suite.few_shot_scope == "stage2" else
           "Few-shot: CF model, stage 1 and stage 2 trained on K seeded users only")
  return {"title": title, "table": table, "rows": records}
