"""Collaborative-filtering backbones (stage 0): SASRec, NCF, GRU4Rec, NextItNet.

`CF_MODELS` maps `config.cf.model` to the module class; `make_cf_model(config.cf, N)` builds
one from the config section. All share the surface documented in `common.py`.
"""

from __future__ import annotations

from typing import Any

from allmrec_jax.models.cf.common import CFConfig, CFSurface, to_cf_config
from allmrec_jax.models.cf.gru4rec import GRU4Rec
from allmrec_jax.models.cf.ncf import NCF
from allmrec_jax.models.cf.nextitnet import NextItNet
from allmrec_jax.models.cf.sasrec import SASRec

CF_MODELS: dict[str, type[CFSurface]] = {
    "sasrec": SASRec,
    "ncf": NCF,
    "gru4rec": GRU4Rec,
    "nextitnet": NextItNet,
}


def make_cf_model(cf_config: Any, num_items: int) -> CFSurface:
  """The backbone named by `cf_config.model`, built from the `config.cf` section."""
  cfg = to_cf_config(cf_config, num_items)
  if cfg.model not in CF_MODELS:
    raise ValueError(f"config.cf.model={cfg.model!r} is not one of {sorted(CF_MODELS)}")
  return CF_MODELS[cfg.model](cfg)


__all__ = ["CF_MODELS", "CFConfig", "CFSurface", "make_cf_model", "SASRec", "NCF", "GRU4Rec",
           "NextItNet"]
