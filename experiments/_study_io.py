"""Files the study scripts carry between machines: the stage-1 item tables as an `.npz`.

A machine without the stage-1 checkpoint (or SBERT) trains stage 2 from the item tables
of a finished run (`trainers/item_tables.item_tables`), exported here with
`save_item_tables` and read there with `load_item_tables` (no pickle; every array checked
against the dataset's item count).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from allmrec_jax.data import prepare
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import item_tables as item_tables_lib

ITEM_TABLE_KEYS = ("cf", "joint", "text")


def save_item_tables(config, workdir, path, keys=ITEM_TABLE_KEYS) -> dict[str, np.ndarray]:
  """Writes `keys` of the item tables of a run folder whose cf and stage1 are finished to
  `path` (.npz, no pickle); returns them."""
  workdir = pathlib.Path(workdir).expanduser()
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
  tables = item_tables_lib.item_tables(config, workdir, ds, cf_model, {"params": cf_params})
  tables = {k: tables[k] for k in keys}
  np.savez(path, **tables)
  return tables


def load_item_tables(path, num_rows: int | None, keys=ITEM_TABLE_KEYS,
                     flag: str = "tables") -> dict[str, np.ndarray]:
  """The float32 item tables `keys` of a `save_item_tables` file, each checked to be 2-D
  with `num_rows` rows (the dataset's items + padding; None: any); a missing array or a
  wrong shape is a one-line error naming `--flag=path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{flag}={path}: no such file")
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in keys if k not in f]
    if missing:
      raise ValueError(f"--{flag}={path}: missing arrays {missing} (has {sorted(f)})")
    tables = {k: np.asarray(f[k], np.float32) for k in keys}
  check_item_tables(tables, num_rows, f"--{flag}={path}")
  return tables


def check_item_tables(tables: dict[str, np.ndarray], num_rows: int | None,
                      source: str) -> None:
  """Each table 2-D with `num_rows` rows (None: any); else a one-line error naming
  `source`."""
  for k, t in tables.items():
    if t.ndim != 2 or num_rows not in (None, t.shape[0]):
      raise ValueError(f"{source}: {k!r} has shape {t.shape}, expected "
                       f"[{num_rows} rows, dim] (this dataset's items + padding)")
