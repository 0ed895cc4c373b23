"""Fixtures of the CF tests: a tiny learnable dataset and a tiny CF config."""

from __future__ import annotations

import numpy as np
import pytest

from allmrec_jax.data import dataset as dataset_lib
from configs import base

NUM_ITEMS = 160
NUM_USERS = 48
MAXLEN = 12


def make_pattern_dataset(seed: int = 0) -> dataset_lib.RecDataset:
  """Users walk the item ring with a user-specific stride (1 or 2): next item predictable."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(8, 20, size=NUM_USERS)
  seqs = []
  for n in lengths:
    start, stride = int(rng.integers(1, NUM_ITEMS + 1)), int(rng.integers(1, 3))
    seqs.append((start - 1 + stride * np.arange(n)) % NUM_ITEMS + 1)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return dataset_lib.build_dataset(
      name="cf-tiny", domain="movies", seq_offsets=offsets, seq_items=np.concatenate(seqs),
      num_items=NUM_ITEMS, titles=[""] + [f"item {i}" for i in range(1, NUM_ITEMS + 1)],
      descriptions=[""] * (NUM_ITEMS + 1), genres=[[] for _ in range(NUM_ITEMS + 1)],
      candidate_seed=7)


@pytest.fixture(scope="session")
def pattern_dataset():
  return make_pattern_dataset()


def tiny_config(model: str = "sasrec", num_epochs: int = 4, eval_every: int = 2):
  c = base.get_base_config()
  c.data.maxlen = MAXLEN
  c.cf.model = model
  c.cf.hidden_dim = 16
  c.cf.dropout = 0.1
  c.cf.lr = 1e-2
  c.cf.batch_size = 16
  c.cf.num_epochs = num_epochs
  c.cf.eval_every = eval_every
  c.cf.patience = 100
  c.cf.conv_blocks = 2
  c.cf.eval_batch_size = 32
  c.cf.progress = False
  c.mesh.shape = (-1, 1, 1)
  return c
