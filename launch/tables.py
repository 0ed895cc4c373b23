"""The paper's tables in miniature from one run folder (allmrec_jax/paper_tables/).

  python launch/train.py --config=configs/ml100k.py --workdir=runs/ml100k --config.stages=cf,stage1
  python launch/tables.py --config=configs/ml100k.py --workdir=runs/ml100k            # default parts
  python launch/tables.py --config=configs/ml100k.py --workdir=runs/ml100k --parts=all

Parts: overall, cold_warm, cold_users, few_shot, cross_domain, model_agnostic, ablations,
efficiency (default: overall,cold_warm,efficiency). Pass the --config.* overrides the run
was trained with. Finished parts and models are reused; an interrupted run resumes.
Writes workdir/tables/<part>.{json,md}, workdir/tables/overall.png and workdir/tables.md.
"""

import contextlib
import os
import pathlib
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import launch
from allmrec_jax import host_memory
from allmrec_jax import logging_utils
from allmrec_jax import run_lock
from allmrec_jax.paper_tables import suite as tables
from configs import base

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "the run's config file, with the run's --config.<field> overrides. "
    "Fields:\n" + base.field_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the run folder (cf and stage1 finished)")
_PARTS = flags.DEFINE_string("parts", ",".join(tables.DEFAULT_PARTS),
                             f"comma list of {', '.join(tables.PARTS)}, or all")
_USERS = flags.DEFINE_integer("users", 0, "test users scored in every table (a seeded "
                              "subset; 0 = config.eval.max_users)")
_FEW_SHOT = flags.DEFINE_list("few_shot", ["128", "256"], "K of the few-shot part")
_FEW_SHOT_SCOPE = flags.DEFINE_enum(
    "few_shot_scope", "stage2", list(tables.FEW_SHOT_SCOPES),
    "what the few-shot part trains on the K users: stage2 (on the run's CF model and "
    "stage 1) or all (the paper's: CF model, stage 1 and stage 2)")
_BACKBONES = flags.DEFINE_list("backbones", list(tables.BACKBONES),
                               "CF backbones of the overall and model-agnostic parts")
_OVERALL_LLM = flags.DEFINE_list("overall_llm", list(tables.OVERALL_LLM),
                                 "LLM baselines of the overall and cold_warm tables (each "
                                 "trained one is a stage-2 training)")
_EFFICIENCY_STEPS = flags.DEFINE_integer("efficiency_steps", 20,
                                         "timed training steps per model (efficiency)")
_CROSS_TARGET = flags.DEFINE_string(
    "cross_domain_target", "", "cross-domain target dataset spec, e.g. "
    "amazon2018:DIR:Video_Games for a run on Movies_and_TV (\"\" = the MovieLens genre "
    "split of the run's dataset)")
_CROSS_USER = flags.DEFINE_enum(
    "cross_domain_user", "none", list(tables.CROSS_DOMAIN_USERS),
    "x_u of the cross-domain target users: none (no user token) or decoded (the source CF "
    "model over stage 1's text-decoded item embeddings; not NCF)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host_memory.reexec_with_huge_pages()   # first: it restarts the process once
  logging_utils.quiet_libraries()
  config = _CONFIG.value
  if config.asset_cache_dir:
    os.environ["ALLMREC_CACHE"] = os.path.expanduser(config.asset_cache_dir)
  try:
    parts = tables.parse_parts(_PARTS.value)
    few_shot = [int(k) for k in _FEW_SHOT.value]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # A writer (it trains and writes workdir/tables): it holds workdir/run.lock. While
  # another process holds it, finished tables are only read (printed, nothing written).
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    lock = run_lock.acquire(workdir) if run_lock.is_local(_WORKDIR.value) else None
  except run_lock.RunLockHeld as e:
    doc = workdir / "tables.md"
    if doc.exists() and all((workdir / "tables" / f"{p}.json").exists() for p in parts):
      logging.warning("%s; printing the finished tables without writing", e)
      print(doc.read_text())
      return
    raise SystemExit(f"allmrec-tables: {e}") from None
  with lock or contextlib.nullcontext():
    _build(config, parts, few_shot)


def _build(config, parts, few_shot):
  suite = tables.PaperTables(config, _WORKDIR.value, users=_USERS.value, few_shot=few_shot,
                             few_shot_scope=_FEW_SHOT_SCOPE.value, backbones=_BACKBONES.value,
                             efficiency_steps=_EFFICIENCY_STEPS.value,
                             cross_domain_target=_CROSS_TARGET.value,
                             cross_domain_user=_CROSS_USER.value,
                             overall_llm=_OVERALL_LLM.value)
  command = "allmrec-tables " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  doc = suite.run(parts, command=command)
  logging.info("tables: %s", doc)
  print(doc.read_text())


def run():
  """The `allmrec-tables` console script."""
  launch.run(main, __name__)


if __name__ == "__main__":
  app.run(main)
