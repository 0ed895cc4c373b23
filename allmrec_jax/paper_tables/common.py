"""What every paper-table part uses: per-user result rows, markdown tables, config
overrides and the bar chart."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from matplotlib import figure
import ml_collections
import numpy as np

from allmrec_jax import metrics as metrics_lib
from allmrec_jax.trainers import evaluate as eval_lib

BACKBONES = {"sasrec": "SASRec", "ncf": "NCF", "gru4rec": "GRU4Rec",
             "nextitnet": "NextItNet"}
COLUMNS = (("hit@1", "hit@1"), ("hit@5", "hit@5"), ("ndcg@10", "NDCG@10"), ("mrr", "MRR"),
           ("gen_hit@1", "gen hit@1"))


@dataclasses.dataclass(frozen=True)
class Row:
  """One model's per-user results on an evaluation set: rank int[B] of the target among
  the candidates (0 = first) and gen_hit float[B] (None: no generation protocol)."""
  label: str
  users: np.ndarray
  rank: np.ndarray
  gen_hit: np.ndarray | None = None

  def metrics(self, mask: np.ndarray | None = None) -> dict[str, float]:
    keep = np.ones(len(self.rank), bool) if mask is None else np.asarray(mask, bool)
    out = {"users": float(keep.sum())}
    if keep.any():
      out.update(metrics_lib.metrics_from_ranks(self.rank[keep], (1, 5, 10), prefix=""))
      if self.gen_hit is not None:
        out["gen_hit@1"] = float(np.mean(self.gen_hit[keep]))
    return out


def scored_row(label: str, es: eval_lib.EvalSet, scores: np.ndarray) -> Row:
  """The Row of candidate scores float[B, C] (candidate order) on `es`."""
  return Row(label, es.users, metrics_lib.rank_of_target(np.asarray(scores, np.float64)))


def saved_row(label: str, path: pathlib.Path) -> Row:
  """The Row of an evaluation kept by `Stage2Run.evaluated` (eval/<key>.json)."""
  saved = json.loads(path.read_text())
  if "rank" not in saved:
    raise ValueError(f"{path}: no per-user ranks (written by an older version); delete it "
                     "to evaluate again")
  gen = saved.get("gen_hit")
  return Row(label, np.asarray(saved["users"]), np.asarray(saved["rank"]),
             None if gen is None else np.asarray(gen, np.float32))


def overridden(config: ml_collections.ConfigDict, overrides: dict[str, object]
               ) -> ml_collections.ConfigDict:
  """A copy of `config` with {"section.field": value} set (references resolved)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      if field not in c[section]:
        raise KeyError(f"config has no field {key}")
      c[section][field] = value
  return c


def md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.4f}"


def metric_table(rows: list[Row], masks: dict[str, np.ndarray | None] | None = None,
                 columns=COLUMNS) -> tuple[str, list[dict]]:
  """Markdown table of `rows` (one column per metric of `columns`, per mask when given)
  and every metric as records."""
  masks = masks or {"": None}
  header, records, lines = ["model"], [], []
  for name in masks:
    header += [f"{name} {title}".strip() for _, title in columns]
  for row in rows:
    rec, cells = {"model": row.label}, [row.label]
    for name, mask in masks.items():
      m = row.metrics(mask)
      rec[name or "all"] = m
      cells += [_fmt(m.get(key)) for key, _ in columns]
    records.append(rec)
    lines.append(cells)
  return md_table(header, lines), records


def hit_chart(rows: list[Row], title: str, path: pathlib.Path):
  """Bars of ranking and generation hit@1 per row, chance marked; written to `path`."""
  labels = [r.label for r in rows]
  hit1 = [r.metrics()["hit@1"] for r in rows]
  gen = [r.metrics().get("gen_hit@1", 0.0) for r in rows]
  x = np.arange(len(rows))
  fig = figure.Figure(figsize=(max(6, 0.8 * len(rows)), 3.6))
  ax = fig.subplots()
  ax.bar(x - 0.2, hit1, 0.4, label="ranking hit@1")
  ax.bar(x + 0.2, gen, 0.4, label="generation hit@1")
  ax.axhline(1 / 20, color="gray", lw=0.8, ls="--", label="chance (1/20)")
  ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("hit@1")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
