"""Model-agnostic: A-LLMRec on each CF backbone (CF, stage 1 and stage 2 trained for each)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from allmrec_jax.paper_tables import common

if TYPE_CHECKING:
  from allmrec_jax.paper_tables.suite import PaperTables


def model_agnostic(suite: PaperTables) -> dict:
  rows = []
  for b in suite.backbones:
    config, wd = suite.cf_backbone(b)
    if wd != suite.workdir:
      suite.prepare_variant(f"backbone_{b}", config, suite.ds, ["cf", "stage1"])
    name = "base" if wd == suite.workdir else f"backbone_{b}"
    rows.append(suite.cf_row(b))
    rows.append(suite.allmrec_row(
        name, f"A-LLMRec ({common.BACKBONES[b]})",
        lambda config=config, wd=wd, name=name: suite.stage2_run(name, config, wd)))
  table, records = common.metric_table(rows)
  return {"title": "Model-agnostic: A-LLMRec on each CF backbone (CF, stage 1 and stage 2 "
                   "trained for each)", "table": table, "rows": records}
