"""Ablations: stage 1 without each loss term or with SBERT frozen (trained again on the
run's CF model), and the stage-2 variants without the user token, without the joint
embeddings, with random joint embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from allmrec_jax.paper_tables import common

if TYPE_CHECKING:
  from allmrec_jax.paper_tables.suite import PaperTables

STAGE1_ABLATIONS = {
    "no_match": ("w/o L_matching", {"w_match": 0.0}),
    "no_recon": ("w/o L_item-recon & L_text-recon", {"w_item_recon": 0.0,
                                                      "w_text_recon": 0.0}),
    "no_rec": ("w/o L_rec", {"w_rec": 0.0}),
    "frozen_sbert": ("Freeze SBERT", {"freeze_sbert": True}),
}
# `variants.VARIANTS` keys (each also a `baselines.BASELINES` key).
STAGE2_ABLATIONS = ("no_user", "no_items", "random_items")


def ablations(suite: PaperTables) -> dict:
  base = lambda: suite.stage2_run("base")
  rows = [suite.allmrec_row("base", "A-LLMRec", base)]
  for key, (label, fields) in STAGE1_ABLATIONS.items():
    config = common.overridden(suite.config, {f"stage1.{f}": v for f, v in fields.items()})
    name = f"stage1_{key}"
    path = suite.out / "eval" / name / "allmrec.json"
    wd = suite.variant_dir(name)
    if not path.exists():
      suite.prepare_variant(name, config, suite.ds, ["stage1"], share_cf=True)
    rows.append(suite.allmrec_row(
        name, f"stage 1 {label}",
        lambda config=config, wd=wd, name=name: suite.stage2_run(name, config, wd)))
  rows += [suite.baseline_row("base", key) for key in STAGE2_ABLATIONS]
  table, records = common.metric_table(rows)
  return {"title": "Ablations (stage 1: trained again on the run's CF model; stage 2: "
                   "the run's stage 1)", "table": table, "rows": records}
