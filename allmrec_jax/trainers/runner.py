"""The whole method in order: data -> CF (stage 0) -> stage 1 -> stage 2 -> evaluation.

`train_and_evaluate(config, workdir)` runs the stages named in `config.stages`; a stage
whose outputs exist is restored, not rerun, and an interrupted stage resumes from its
latest checkpoint. Outputs under `workdir`: `cf/`, `stage1/`, `stage2/` (+ `stage2_mlp_llm/`),
`stage2/metrics.json` (A-LLMRec under `test/...`, each baseline under
`baselines/<name>/test/...`), `results.md` and `config.json`.

Where the parts live: config checks and the rerun policy `run_config.py`; the item tables
`item_tables.py`; the shared stage-2 context `stage2_run.py`; the models `variants.py` and
`baselines.py`; `results.md` `reporting.py`; the genre question `genre_task.py`.
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import logging
import numpy as np

from allmrec_jax import config_lib
from allmrec_jax import host_memory
from allmrec_jax import run_config
from allmrec_jax import sharding
from allmrec_jax.data import prepare
from allmrec_jax.trainers import baselines as baselines_lib
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import genre_task as genre_task_lib
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import reporting
from allmrec_jax.trainers import stage1 as stage1_lib
from allmrec_jax.trainers import stage2_run as stage2_run_lib


def run_stage2(config, workdir: pathlib.Path, ds, *, cf_model, cf_params,
               item_tables: dict[str, np.ndarray], mesh=None, rules=None) -> dict:
  """Trains A-LLMRec's projectors, evaluates them (ranking, generation, soft-token
  diagnostics) and the baselines, writes `stage2/metrics.json` and `results.md`; returns the
  metrics."""
  out_path = workdir / "stage2" / "metrics.json"
  if out_path.exists():
    logging.info("stage2: %s exists; skipping (delete it to re-evaluate)", out_path)
    return json.loads(out_path.read_text())
  with host_memory.huge_pages_stopped() as stopped:   # steadier steps (host_memory.py)
    if stopped:
      logging.info("stage2: no new transparent huge pages until it ends")
    return _train_and_evaluate_stage2(config, workdir, ds, out_path, cf_model=cf_model,
                                      cf_params=cf_params, item_tables=item_tables,
                                      mesh=mesh, rules=rules)


def _train_and_evaluate_stage2(config, workdir: pathlib.Path, ds, out_path: pathlib.Path, *,
                               cf_model, cf_params, item_tables, mesh, rules) -> dict:
  """`run_stage2`'s work once it is known not to be done; writes `out_path`."""
  baselines = baselines_lib.baselines_of(config)
  run = stage2_run_lib.make_stage2_run(config, workdir, ds, cf_model=cf_model,
                                       cf_params=cf_params, item_tables=item_tables,
                                       mesh=mesh, rules=rules)
  prefix = run.prefix
  metrics: dict[str, float] = {"eval/num_users": float(len(run.es.users))}

  allmrec, model = baselines_lib.evaluate_allmrec(run, prefix)
  metrics.update(allmrec)
  metrics["eval/users_per_s"] = len(run.es.users) / metrics["eval/allmrec/seconds"]

  diagnostics = tuple(config_lib.as_list(run.ecfg.diagnostics))

  def evaluate_diagnostics(_):
    known = None
    if f"{prefix}target_loss" in metrics:   # the A-LLMRec evaluation above: no third pass
      known = {k: metrics[f"{prefix}{m}"] for k, m in (("hit@1", "hit@1"), ("mrr", "mrr"),
                                                        ("loss", "target_loss"))}
    return {}, eval_lib.soft_token_diagnostics(model.evaluator, model.params, run.es,
                                               run.user_rep, f"diag/{prefix}",
                                               seed=config.seed, true_metrics=known,
                                               which=diagnostics)
  if diagnostics:
    metrics.update(run.evaluated("diagnostics", "diagnostics", evaluate_diagnostics))

  for name in baselines:
    metrics.update(baselines_lib.BASELINES[name].score(run, f"baselines/{name}/{prefix}"))
  genre = None
  if int(run.ecfg.genre_users) > 0:
    genre = genre_task_lib.genre_task(run, model)
    metrics.update(genre["metrics"])
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
  reporting.write_results(workdir / "results.md", metrics, baselines, prefix, run.es,
                          run.builder, ds, run.examples, run.ecfg.num_examples, genre=genre,
                          config=config)
  return metrics


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
  """Runs `config.stages` in order on `config.data`; returns the last stage's metrics."""
  workdir = pathlib.Path(workdir).expanduser()
  run_config.validate_config(config)
  stages = run_config.stages_of(config)
  run_config.save_config(config, workdir)
  ds = prepare.prepare_dataset(config.data)
  logging.info("dataset %s: %s", ds.name, ds.statistics())
  return run_stages(config, workdir, ds, stages)


def run_stages(config, workdir: pathlib.Path, ds, stages: list[str]) -> dict:
  """Runs `stages` (of cf, stage1, stage2) on dataset `ds` in `workdir`; returns the last
  stage's metrics (a finished stage is restored, not rerun)."""
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rules = sharding.axis_rules(config.mesh.logical_axis_rules)
  out: dict = {}
  if "cf" in stages:
    _, _, out = cf_lib.train_and_evaluate(config, workdir, ds)
  cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
  cf_variables = {"params": cf_params}
  if "stage1" in stages:
    out = stage1_lib.train_and_evaluate(config, workdir, ds, cf_model, cf_params)
  if "stage2" in stages:
    tables = item_tables_lib.item_tables(config, workdir, ds, cf_model, cf_variables)
    out = run_stage2(config, workdir, ds, cf_model=cf_model, cf_params=cf_variables,
                     item_tables=tables, mesh=mesh, rules=rules)
  return out
