"""absl logging helpers shared by the launchers and scripts."""

from __future__ import annotations

import logging as py_logging

from absl import logging


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records of chatty libraries (orbax logs every save/restore at INFO)."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def quiet_libraries() -> None:
  """Installs the filter on absl's handler (idempotent per process is not required:
  a second filter drops the same records)."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
