"""The overall table (every model on the suite's users) and its cold / warm item split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from allmrec_jax.data import scenarios
from allmrec_jax.paper_tables import common

if TYPE_CHECKING:
  from allmrec_jax.paper_tables.suite import PaperTables

# The LLM baselines of the overall and cold / warm tables (`baselines.BASELINES` keys).
OVERALL_LLM = ("llm_only", "tallrec", "mlp_llm", "sbert")


def overall_rows(suite: PaperTables) -> list[common.Row]:
  rows = [suite.cf_row(b) for b in suite.backbones]
  rows.append(suite.popularity_row())
  rows += [suite.baseline_row("base", key) for key in suite.overall_llm]
  rows.append(suite.allmrec_row("base", "A-LLMRec", lambda: suite.stage2_run("base")))
  return rows


def overall(suite: PaperTables) -> dict:
  rows = overall_rows(suite)
  table, records = common.metric_table(rows)
  common.hit_chart(rows, f"{suite.ds.name}: {len(suite.es.users)} test users, 20 candidates",
                   suite.out / "overall.png")
  return {"title": f"Overall ({len(suite.es.users)} test users, 20 candidates)",
          "table": table, "rows": records, "image": "overall.png"}


def cold_warm(suite: PaperTables) -> dict:
  cold, warm = scenarios.cold_warm_items(suite.ds, float(suite.config.data.cold_fraction))
  targets = suite.es.targets
  masks = {"cold": np.isin(targets, cold), "warm": np.isin(targets, warm)}
  table, records = common.metric_table(
      overall_rows(suite), masks,
      [c for c in common.COLUMNS if c[0] in ("hit@1", "mrr", "gen_hit@1")])
  frac = float(suite.config.data.cold_fraction)
  return {"title": f"Cold / warm items (targets in the bottom / top {frac:.0%} of items "
                   f"by interactions: {int(masks['cold'].sum())} / "
                   f"{int(masks['warm'].sum())} of {len(targets)} users)",
          "table": table, "rows": records}
