"""Logging helpers shared by the trainers, launchers and scripts."""

from __future__ import annotations

import json
import logging as py_logging
import math
import pathlib

from absl import logging
import jax


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records of chatty libraries (orbax logs every save/restore at INFO)."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def quiet_libraries() -> None:
  """Installs the filter on absl's handler (idempotent per process is not required:
  a second filter drops the same records)."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


class TensorBoard:
  """TensorBoard scalars via tensorboardX (a no-op when it is missing); `@` in a name
  becomes `_at_`."""

  def __init__(self, logdir: pathlib.Path):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.w = SummaryWriter(str(logdir))
    except ImportError:
      self.w = None

  def scalars(self, step: int, values: dict[str, float]):
    if self.w is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.w.add_scalar(k.replace("@", "_at_"), v, step)   # "@" is not a legal TB tag

  def close(self):
    if self.w is not None:
      self.w.close()


class MetricWriter:
  """One writer of a stage's metrics: a row per `write` in `<dir>/metrics.jsonl` and the
  same scalars in TensorBoard (`<dir>/tb`). Only process 0 of a multi-host run writes.

  `truncate(key, last)` keeps the rows whose `key` ("step", "epoch") is <= last: what an
  interrupted run logged past the checkpoint it resumes from is dropped, so a resumed run
  logs every row once."""

  def __init__(self, directory: pathlib.Path, name: str = "metrics.jsonl"):
    self.primary = jax.process_index() == 0
    self.path = pathlib.Path(directory) / name
    self.tb = TensorBoard(pathlib.Path(directory) / "tb") if self.primary else None

  def truncate(self, key: str, last: int) -> None:
    if not self.primary or not self.path.exists():
      return
    rows = [r for r in self.path.read_text().splitlines() if r.strip()]
    keep = [r for r in rows if json.loads(r).get(key, 0) <= last]
    if len(keep) != len(rows):
      self.path.write_text("".join(r + "\n" for r in keep))

  def reset(self) -> None:
    """Removes the rows of an earlier run (a fresh start)."""
    if self.primary and self.path.exists():
      self.path.unlink()

  def write(self, row: dict, tb_step: int) -> None:
    if not self.primary:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    self.tb.scalars(tb_step, {k: v for k, v in row.items() if k not in ("step", "epoch")})

  def scalars(self, tb_step: int, values: dict) -> None:
    """TensorBoard only (values that are not a metrics.jsonl row)."""
    if self.primary:
      self.tb.scalars(tb_step, values)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_curve(path: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """{metric: [(step, value)]} of a metrics.jsonl."""
  out: dict[str, list[tuple[int, float]]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        row = json.loads(line)
        for k, v in row.items():
          if k not in ("step", "epoch") and isinstance(v, (int, float)):
            out.setdefault(k, []).append((int(row["step"]), float(v)))
  return out


def plot_learning_curve(metrics_path: pathlib.Path, png_path: pathlib.Path, title: str):
  """The logged training loss (one step every log_every) and validation hit@1 against
  the step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  curve = read_curve(metrics_path)
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
  if "train/loss" in curve:
    st, v = zip(*curve["train/loss"])
    ax[0].plot(st, v, lw=0.8)
  ax[0].set(xlabel="step", ylabel="train loss (target tokens)", title=title)
  for k in sorted(curve):
    if k.startswith("val/") and "hit@1" in k:
      st, v = zip(*curve[k])
      ax[1].plot(st, v, marker="o", ms=3, label=k)
  if any(k.startswith("val/") for k in curve):
    ax[1].legend(fontsize=8)
  ax[1].set(xlabel="step", ylabel="validation hit@1 (20 candidates)")
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
