"""Vectorised negative sampling: exclusion, distinctness, fallbacks, batch independence."""

from __future__ import annotations

import numpy as np

from allmrec_jax.data import sampling


def _index():
  # user 0: items 1..28 of 30 (2 allowed); user 1: items {5}; user 2: every item
  users = np.concatenate([np.zeros(28, int), [1], np.full(30, 2)])
  items = np.concatenate([np.arange(1, 29), [5], np.arange(1, 31)])
  return sampling.ExclusionIndex(users, items, 3, 30)


def test_exclusion_and_fallbacks():
  index = _index()
  np.testing.assert_array_equal(index.sizes, [28, 1, 30])
  rng = np.random.Generator(np.random.Philox(key=[0, 1]))
  out = sampling.sample_excluding(np.array([0, 1, 2]), 2, index,
                                  sampling.generator_draw(30, rng), distinct=True)
  assert sorted(out[0].tolist()) == [29, 30]          # exactly the two allowed items
  assert 5 not in out[1] and out[1, 0] != out[1, 1]
  np.testing.assert_array_equal(out[2], [0, 0])       # no negative exists -> padding
  many = sampling.sample_excluding(np.array([0]), 5, index,
                                   sampling.generator_draw(30, rng), distinct=True)
  assert set(many[0].tolist()) <= {29, 30}            # fewer allowed than k: repeats


def test_hashed_draws_do_not_depend_on_the_batch():
  users = np.arange(50)
  index = sampling.ExclusionIndex(users, (users % 7) + 1, 50, 100)
  a = sampling.sample_excluding(users, 8, index,
                                sampling.hashed_draw(100, 1, 0, users, stream=9),
                                distinct=True)
  perm = np.random.default_rng(0).permutation(50)
  b = sampling.sample_excluding(users[perm], 8, index,
                                sampling.hashed_draw(100, 1, 0, users[perm], stream=9),
                                distinct=True)
  np.testing.assert_array_equal(a[perm], b)
  assert not index.contains(users[:, None], a).any()
  assert all(np.unique(r).size == 8 for r in a)
  c = sampling.sample_excluding(users, 8, index,
                                sampling.hashed_draw(100, 2, 0, users, stream=9),
                                distinct=True)
  assert (a != c).mean() > 0.9


def test_hashed_items_uniform():
  x = sampling.hashed_items(10, 3, np.arange(200_000))
  counts = np.bincount(x, minlength=11)
  assert counts[0] == 0 and x.max() == 10
  assert np.abs(counts[1:] / 20_000 - 1).max() < 0.03
  draw = sampling.hashed_draw(10, 0, 0, np.arange(1000), stream=1)
  rows = np.repeat(np.arange(1000), 200)
  cols = np.tile(np.arange(200), 1000)
  counts = np.bincount(draw(rows, cols, 0), minlength=11)
  assert counts[0] == 0 and np.abs(counts[1:] / 20_000 - 1).max() < 0.03
  assert not np.array_equal(draw(rows, cols, 0), draw(rows, cols, 1))


def test_sparse_index_gives_the_same_draws(monkeypatch):
  rng = np.random.default_rng(0)
  users = rng.integers(0, 400, 6000)
  items = rng.integers(1, 301, 6000)
  dense = sampling.ExclusionIndex(users, items, 400, 300)
  monkeypatch.setattr(sampling, "DENSE_LIMIT", 0)
  sparse = sampling.ExclusionIndex(users, items, 400, 300)
  assert dense.dense is not None and sparse.dense is None
  batch = rng.choice(400, 64, replace=False)             # < U/4 rows: restricted index
  out = [sampling.sample_excluding(batch, 30, ix,
                                   sampling.hashed_draw(300, 5, 2, batch, stream=1),
                                   distinct=True) for ix in (dense, sparse)]
  np.testing.assert_array_equal(out[0], out[1])
  assert not dense.contains(batch[:, None], out[0]).any()
  np.testing.assert_array_equal(sparse.restrict(batch).contains(batch[:, None], out[0]),
                                np.zeros((64, 30), bool))
