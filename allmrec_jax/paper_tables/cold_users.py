"""Cold users: users held out of every training stage, scored with 2 history items."""

from __future__ import annotations

from typing import TYPE_CHECKING

from allmrec_jax.data import scenarios
from allmrec_jax.paper_tables import common
from allmrec_jax.trainers import evaluate as eval_lib

if TYPE_CHECKING:
  from allmrec_jax.paper_tables.suite import PaperTables


def cold_users(suite: PaperTables) -> dict:
  config = suite.config
  split = scenarios.cold_user_split(suite.ds, num_users=int(config.data.num_cold_users),
                                    seed=int(config.seed))
  wd = suite.prepare_variant("cold_users", config, split.train, ["cf", "stage1"])
  arrays = split.eval_arrays(maxlen=config.data.maxlen, num_history=config.eval.num_history)
  users = split.held_out_users if split.held_out_users.size else arrays["user"]
  es = eval_lib.eval_set(users, arrays["seq"], arrays["history"], arrays["candidates"],
                         config.data.candidate_seed)
  run_fn = lambda: suite.stage2_run("cold_users", workdir=wd, ds=split.train, es=es)
  rows = [suite.trained_cf_row(common.BACKBONES[config.cf.model], config, wd, split.train,
                               es),
          suite.popularity_row(split.train, es),
          suite.baseline_row("cold_users", "llm_only", run_fn),
          suite.allmrec_row("cold_users", "A-LLMRec", run_fn)]
  table, records = common.metric_table(rows)
  return {"title": f"Cold users ({split.num_users} users held out of every training "
                   "stage; 2 history items, 1 target, 20 candidates)",
          "table": table, "rows": records}
