"""Slow: stage 1 on the real MovieLens-100K + all-MiniLM-L6-v2 (frozen SBERT, random CF).

Asserts loosely that alignment happens: text->item retrieval well above chance and the
loss terms decrease.
"""

from __future__ import annotations

import jax
import pytest

from allmrec_jax.data import prepare
from allmrec_jax.models import cf as cf_lib
from allmrec_jax.trainers import stage1
from configs import ml100k


@pytest.mark.slow
def test_ml100k_alignment_above_chance(tmp_path):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = ml100k.get_config()
  config.stage1.freeze_sbert = True
  config.stage1.num_epochs = 10
  ds = prepare.prepare_dataset(config.data)
  cf = dict(config.cf)
  cf["maxlen"] = config.data.maxlen
  cf_model = cf_lib.make_cf_model(cf, ds.num_items)
  seq = jnp.ones((1, config.data.maxlen), jnp.int32)
  cf_vars = nn.unbox(cf_model.init(jax.random.key(0), seq, seq, seq))
  out = stage1.train_and_evaluate(config, tmp_path, ds, cf_model, cf_vars)
  chance = out["align/random_recall@10"]
  assert out["align/text2item_recall@10"] > 3 * chance, out
  for term in ("match", "item_recon", "text_recon"):
    assert out[f"final/train/{term}"] < out[f"first/train/{term}"], term
  assert 0 < out["cold/num_users"] < ds.num_users
