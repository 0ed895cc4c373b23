"""The item-embedding tables stage 2 can feed to F_I, from a trained CF model and stage 1.

  joint  = f_I^enc(E)                 the paper's joint embeddings (A-LLMRec)
  text   = f_T^enc(SBERT(item text))  the text path (A-LLMRec (SBERT); unseen items)
  cf     = E                          the CF item embeddings (MLP-LLM)
  random = a fixed seeded uniform table (the random-joint-embedding ablation)

`item_tables` computes them for a run folder.
"""

from __future__ import annotations

import pathlib

import numpy as np

from allmrec_jax.trainers import stage1 as stage1_lib


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
