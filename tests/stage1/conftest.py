"""Fixtures of the stage-1 tests: a tiny dataset, a tiny SBERT directory, a random CF model."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.models import cf as cf_lib
from allmrec_jax.testing import write_tiny_sbert
from configs import base

NUM_ITEMS = 130
NUM_USERS = 14
MAXLEN = 8
WORDS = ["Star", "Wars", "Toy", "Story", "Heat", "Casino", "Fargo", "Babe", "Alien", "Dune",
         "Night", "City", "Love", "War", "Blue", "Red", "Dead", "Man", "Lost", "Home"]


def make_dataset(seed: int = 0) -> dataset_lib.RecDataset:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, 12, size=NUM_USERS)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  items = np.concatenate([rng.choice(np.arange(1, NUM_ITEMS + 1), size=n, replace=False)
                          for n in lengths])
  titles = [""] + [f"{' '.join(rng.choice(WORDS, size=rng.integers(1, 5)))} "
                   f"({1950 + i % 50})" for i in range(1, NUM_ITEMS + 1)]
  descriptions = [""] + [("a film about " + " ".join(rng.choice(WORDS, size=6)))
                         if i % 3 == 0 else "" for i in range(1, NUM_ITEMS + 1)]
  return dataset_lib.build_dataset(
      name="tiny", domain="movies", seq_offsets=offsets, seq_items=items,
      num_items=NUM_ITEMS, titles=titles, descriptions=descriptions,
      genres=[[] for _ in range(NUM_ITEMS + 1)], candidate_seed=3)


@pytest.fixture(scope="session")
def tiny_dataset():
  return make_dataset()


@pytest.fixture(scope="session")
def tiny_sbert_dir(tmp_path_factory):
  return write_tiny_sbert(tmp_path_factory.mktemp("tiny_sbert"))


def make_config(sbert_dir, **stage1):
  c = base.get_base_config()
  c.data.maxlen = MAXLEN
  c.cf.hidden_dim = 12
  c.cf.num_blocks = 1
  c.sbert.path = str(sbert_dir)
  c.sbert.max_len = 24
  c.stage1.batch_size = 4
  c.stage1.num_epochs = 2
  c.stage1.latent_dim = 8
  c.stage1.eval_batch_size = 32
  for k, v in stage1.items():
    c.stage1[k] = v
  return c


def make_cf(config, num_items, model_name="sasrec", seed=0):
  cf = dict(config.cf)
  cf["model"] = model_name
  cf["maxlen"] = config.data.maxlen
  model = cf_lib.make_cf_model(cf, num_items)
  seq = jnp.ones((1, config.data.maxlen), jnp.int32)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = nn.unbox(model.init(jax.random.key(seed), seq, seq, seq))
  return model, params
