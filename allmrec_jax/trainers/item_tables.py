"""The item-embedding tables stage 2 can feed to F_I, from a trained CF model and stage 1.

  joint  = f_I^enc(E)                 the paper's joint embeddings (A-LLMRec)
  text   = f_T^enc(SBERT(item text))  the text path (A-LLMRec (SBERT); unseen items)
  cf     = E                          the CF item embeddings (MLP-LLM)
  random = a fixed seeded uniform table (the random-joint-embedding ablation)

`item_tables` computes them for a run folder; `save_item_tables` / `load_item_tables`
carry them as an `.npz` to a machine without the stage-1 checkpoint.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from allmrec_jax.data import prepare
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import stage1 as stage1_lib

ITEM_TABLE_KEYS = ("cf", "joint", "text")


def standardize_items(table: np.ndarray) -> np.ndarray:
  """Each column of the item rows 1..N to mean 0 and standard deviation 1 (row 0, the
  padding item, stays zero). An affine map of F_I's input, which F_I's first Linear can
  represent: the function class is the paper's, only the optimisation's conditioning
  changes. Sigmoid joint codes can sit in a narrow band (ML-100K: per-dimension std 0.033
  around 0.5, mean item-item cosine 0.996), which F_I maps to near-identical soft tokens."""
  table = np.asarray(table, np.float64)
  rows = table[1:]
  mean, std = rows.mean(0), rows.std(0)
  const = std <= 1e-9 * np.maximum(1.0, np.abs(mean))     # a constant column maps to 0
  out = np.zeros_like(table)
  out[1:] = np.where(const, 0.0, (rows - mean) / np.where(const, 1.0, std))
  return out.astype(np.float32)


def item_table_for(source: str, tables: dict[str, np.ndarray], seed: int,
                   standardize: bool = False) -> np.ndarray:
  """The item table fed to F_I: joint (paper), text (A-LLMRec SBERT), cf (MLP-LLM), random;
  with `standardize` (config.stage2.item_standardize) per column over the items."""
  if source == "random":
    like = tables["joint"]
    rng = np.random.default_rng(seed)
    table = rng.uniform(size=like.shape).astype(np.float32)   # same range as sigmoid codes
  elif source not in tables:
    raise ValueError(f"config.stage2.item_source={source!r}; known: "
                     f"{sorted(tables) + ['random']}")
  else:
    table = np.asarray(tables[source], np.float32)
  return standardize_items(table) if standardize else table


def item_tables(config, workdir: pathlib.Path, ds, cf_model, cf_params) -> dict[str, np.ndarray]:
  """The item tables stage 2 can feed to F_I, from the trained stage 1 and the CF model:
  joint = f_I^enc(E) (paper), text = f_T^enc(SBERT(text)) (A-LLMRec SBERT), cf = E."""
  cf_table = np.asarray(stage1_lib.cf_item_table(cf_model, cf_params), np.float32)
  s1 = stage1_lib.load_trained_stage1(config, workdir, cf_dim=cf_table.shape[1])
  tables = {"cf": cf_table,
            "joint": np.asarray(stage1_lib.joint_item_embeddings(
                s1.models, s1.params, source="cf", item_table=cf_table), np.float32)}
  tables["text"] = text_item_table(s1, config, ds)
  return tables


def text_item_table(s1, config, ds) -> np.ndarray:
  """float32[N+1, latent] f_T^enc(SBERT(item text)) of `ds`'s items under a trained stage 1
  (`stage1.load_trained_stage1`): the joint embedding of items the CF model never saw."""
  ids, mask = stage1_lib.item_text_table(ds, s1.tokenizer, config.sbert.max_len)
  return np.asarray(stage1_lib.joint_item_embeddings(
      s1.models, s1.params, source="text", text_ids=ids, text_mask=mask), np.float32)


def save_item_tables(config, workdir, path, keys=ITEM_TABLE_KEYS) -> dict[str, np.ndarray]:
  """Writes `keys` of the item tables (`item_tables`) of a run folder whose cf and stage1
  are finished to `path` (.npz, no pickle), so that a machine without the stage-1
  checkpoint (or SBERT) can train stage 2 from them; returns them."""
  workdir = pathlib.Path(workdir).expanduser()
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
  tables = item_tables(config, workdir, ds, cf_model, {"params": cf_params})
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
