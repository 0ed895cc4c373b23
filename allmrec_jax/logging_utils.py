"""Logging helpers shared by the trainers, launchers and scripts."""

from __future__ import annotations

import logging as py_logging
import math
import pathlib

from absl import logging


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
