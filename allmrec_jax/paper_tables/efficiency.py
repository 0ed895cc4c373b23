"""Efficiency: seconds per training step and per epoch, and per user at inference,
A-LLMRec vs TALLRec."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np

from allmrec_jax import config_lib
from allmrec_jax.paper_tables import common
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.trainers import variants as variants_lib

if TYPE_CHECKING:
  from allmrec_jax.paper_tables.suite import PaperTables


def efficiency(suite: PaperTables) -> dict:
  """Seconds per training step (mean after the first logged window, which compiles) and
  per epoch, and per user at inference (rank 20 + generate, compiled shapes), A-LLMRec
  (the run's stage 2, and the paper's frozen LLM when the run trains LoRA) vs TALLRec."""
  path = suite.out / "efficiency_raw.json"
  raw = json.loads(path.read_text()) if path.exists() else {}
  models = [("allmrec", "A-LLMRec", {}, "allmrec")]
  if suite.config.stage2.train_lora:
    models = [("allmrec_frozen", "A-LLMRec (frozen LLM, paper)",
               {"stage2.train_lora": False}, "allmrec"),
              ("allmrec", "A-LLMRec (LoRA, this run)", {}, "allmrec")]
  models.append(("tallrec", "TALLRec", {}, "tallrec"))
  for key, label, fields, variant in models:
    if key not in raw:
      raw[key] = {"label": label, **_time_model(suite, key, label, fields, variant)}
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(raw, indent=2))
  rows, records = [], []
  for key, label, _, _ in models:
    r = raw[key]
    records.append(r)
    rows.append([label, f"{r['seconds_per_step']:.3f}", f"{r['seconds_per_epoch']:.1f}",
                 f"{r['seconds_per_user']:.3f}"])
  tall = raw["tallrec"]
  ratios = [f"{raw[k]['label']}: training {tall['seconds_per_epoch'] / raw[k]['seconds_per_epoch']:.2f}x, "
            f"inference {tall['seconds_per_user'] / raw[k]['seconds_per_user']:.2f}x faster than TALLRec"
            for k, *_ in models if k != "tallrec"]
  table = common.md_table(["model", "s / step", "s / epoch", "s / user (inference)"], rows)
  return {"title": f"Efficiency ({suite.efficiency_steps} timed steps each; paper: A-LLMRec "
                   "2.53x faster in training and 1.71x in inference than TALLRec)",
          "table": table + "\n\n" + "; ".join(ratios) + ".", "rows": records}


def _time_model(suite: PaperTables, key: str, label: str, fields: dict,
                model: str) -> dict[str, float]:
  """Trains variant `model` for the timed steps in tables/efficiency/<key> (with `fields`
  overridden) and times its inference on up to two evaluation batches."""
  run = suite.stage2_run("base")
  steps = suite.efficiency_steps
  config = common.overridden(suite.config, {"stage2.max_steps": steps, "stage2.log_every": 1,
                                            "stage2.eval_every": 0, **fields})
  variant = variants_lib.VARIANTS[model].renamed(key, label, folder=f"tables/efficiency/{key}")
  table = run.item_table(variant)
  params = stage2_lib.train(config, suite.workdir, suite.ds, variant=variant,
                            llm=run.loaded.module, llm_params=run.llm_params,
                            builder=run.builder, user_rep_fn=run.user_representations,
                            item_table=table, mesh=suite.mesh, rules=suite.rules)
  lines = [json.loads(x) for x in
           (suite.workdir / variant.folder / "metrics.jsonl").read_text().splitlines()]
  per_step = [x["train/step_time_s"] for x in lines if "train/step_time_s" in x]
  timed = per_step[1:] or per_step                 # the first step compiles
  cfg = config_lib.Stage2Config.from_config(config)
  ex = stage2_lib.training_examples(suite.ds, maxlen=config.data.maxlen,
                                    num_history=cfg.num_history,
                                    positions_per_user=cfg.positions_per_user)
  steps_per_epoch = len(ex.users) // cfg.batch_size
  ev = run.evaluator(variant, table)
  bs = int(suite.config.eval.batch_size)
  sub = suite.es.take(slice(0, min(2 * bs, len(suite.es.users))))
  rep = run.user_rep[:len(sub.users)] if variant.soft else None
  ev.evaluate(params, sub, rep, desc=f"compile {key}")
  t0 = time.perf_counter()
  ev.evaluate(params, sub, rep, desc=f"time {key}")
  per_user = (time.perf_counter() - t0) / len(sub.users)
  s = float(np.mean(timed))
  return {"seconds_per_step": s, "steps_per_epoch": steps_per_epoch,
          "seconds_per_epoch": s * steps_per_epoch, "seconds_per_user": per_user,
          "timed_users": len(sub.users)}
