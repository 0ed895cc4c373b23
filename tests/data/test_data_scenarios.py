"""Scenario splits: cold/warm items, cold users, few-shot users, cross-domain."""

from __future__ import annotations

import numpy as np
import pytest

from allmrec_jax.data import prepare
from allmrec_jax.data import scenarios
from configs import base

from data_testutil import write_gz_lines  # pylint: disable=g-bad-import-order


def test_cold_warm_items(ml100k):
  cold, warm = scenarios.cold_warm_items(ml100k, 0.35)
  m = int(0.35 * 1349)
  assert cold.size == warm.size == m == 472
  assert np.intersect1d(cold, warm).size == 0
  counts = ml100k.item_counts
  assert counts[cold].max() <= counts[warm].min()
  others = np.setdiff1d(np.arange(1, 1350), np.concatenate([cold, warm]))
  assert counts[cold].max() <= counts[others].min()
  assert counts[others].max() <= counts[warm].min()
  groups = scenarios.cold_warm_users(ml100k, "test")
  cu, wu = groups["cold"], groups["warm"]
  t = ml100k.targets("test")
  assert np.isin(t[cu], cold).all() and np.isin(t[wu], warm).all()
  rest = np.setdiff1d(np.arange(943), np.concatenate([cu, wu]))
  assert not np.isin(t[rest], np.concatenate([cold, warm])).any()


def test_movielens_cold_users(ml100k):
  s = scenarios.cold_user_split(ml100k, num_users=50, seed=1)
  assert s.items.shape == (50, 3) and s.held_out_users.size == 50
  for row, u in zip(s.items, s.held_out_users):
    np.testing.assert_array_equal(row, ml100k.sequence(int(u))[:3])
  assert s.train.num_users == 893
  kept = np.setdiff1d(np.arange(943), s.held_out_users)
  for new_u in (0, 400, 892):
    np.testing.assert_array_equal(s.train.sequence(new_u), ml100k.sequence(int(kept[new_u])))
  assert s.train.num_interactions == 99287 - ml100k.seq_lengths[s.held_out_users].sum()
  np.testing.assert_array_equal(s.candidates[:, 0], s.items[:, 2])
  for r in range(50):
    assert not np.isin(s.candidates[r, 1:], s.items[r]).any()
    assert np.unique(s.candidates[r]).size == 20
  again = scenarios.cold_user_split(ml100k, num_users=50, seed=1)
  np.testing.assert_array_equal(again.held_out_users, s.held_out_users)
  np.testing.assert_array_equal(again.candidates, s.candidates)
  other = scenarios.cold_user_split(ml100k, num_users=50, seed=2)
  assert not np.array_equal(other.held_out_users, s.held_out_users)
  e = s.eval_arrays(maxlen=8, shuffle_seed=0)
  np.testing.assert_array_equal(e["seq"][:, -2:], s.items[:, :2])
  assert np.all(e["seq"][:, :-2] == 0)
  np.testing.assert_array_equal(e["candidates"][np.arange(50), e["target_col"]],
                                s.items[:, 2])


def test_amazon_cold_users_come_from_the_raw_data(tmp_path):
  """Users with exactly 3 reviews, removed by the >=4 filter, become the cold users."""
  reviews, meta = [], []
  for i in range(6):
    meta.append('{"asin": "p%d", "title": "Product %d"}' % (i, i))
  for u in range(6):                                   # warm: 5 reviews each
    for t in range(5):
      reviews.append('{"reviewerID": "w%d", "asin": "p%d", "overall": 5, '
                     '"unixReviewTime": %d}' % (u, (u + t) % 6, t))
  for u, items in (("c1", (4, 0, 2)), ("c2", (1, 3, 5))):   # cold: exactly 3
    for t, i in enumerate(items):
      reviews.append('{"reviewerID": "%s", "asin": "p%d", "overall": 5, '
                     '"unixReviewTime": %d}' % (u, i, 10 - t))   # reverse time order
  write_gz_lines(tmp_path / "Beauty.json.gz", reviews)
  write_gz_lines(tmp_path / "meta_Beauty.json.gz", meta)
  c = base.get_base_config().data
  c.dataset = f"amazon2018:{tmp_path}:Beauty"
  c.data_dir = str(tmp_path / "out")
  c.min_count = 4
  ds = prepare.prepare_dataset(c)
  assert ds.num_users == 6
  assert ds.cold_user_items.shape == (2, 3)
  raw_ids = [[ds.item_ids[i] for i in row] for row in ds.cold_user_items]
  assert sorted(raw_ids) == [["p2", "p0", "p4"], ["p5", "p3", "p1"]]
  s = scenarios.cold_user_split(ds, num_users=0, seed=0)
  assert s.train is ds and s.items.shape == (2, 3)
  np.testing.assert_array_equal(s.candidates[:, 0], s.items[:, 2])
  assert not any(np.isin(s.candidates[r, 1:], s.items[r]).any() for r in range(2))


def test_few_shot_users(ml100k):
  a = scenarios.few_shot_users(ml100k, 128, seed=0)
  assert a.size == 128 and np.unique(a).size == 128 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(a, scenarios.few_shot_users(ml100k, 128, seed=0))
  assert not np.array_equal(a, scenarios.few_shot_users(ml100k, 128, seed=1))
  with pytest.raises(ValueError, match="few-shot K=5000"):
    scenarios.few_shot_users(ml100k, 5000)


def test_cross_domain_split(ml100k):
  src, tgt = scenarios.cross_domain_split(ml100k)
  a_ids, b_ids = set(src.item_ids[1:]), set(tgt.item_ids[1:])
  assert a_ids and b_ids and not a_ids & b_ids
  for ds, mine, other in ((src, scenarios.GENRES_A, scenarios.GENRES_B),
                          (tgt, scenarios.GENRES_B, scenarios.GENRES_A)):
    for i in range(1, ds.num_items + 1):
      g = set(ds.genres[i])
      assert g & set(mine) and not g & set(other)
    assert ds.seq_lengths.min() >= 3
    assert ds.candidates("test").shape == (ds.num_users, 20)
  # titles follow their items
  old = ml100k.item_ids.index(src.item_ids[1])
  assert src.titles[1] == ml100k.titles[old]
  # source users = original users with >= 3 in-domain items, sequences kept in order
  expected = []
  for u in range(ml100k.num_users):
    seq = [ml100k.item_ids[i] for i in ml100k.sequence(u)]
    seq = [x for x in seq if x in a_ids]
    if len(seq) >= 3:
      expected.append(seq)
  assert len(expected) == src.num_users
  for u in (0, 1, src.num_users - 1):
    assert [src.item_ids[i] for i in src.sequence(u)] == expected[u]
  with pytest.raises(ValueError, match="overlap"):
    scenarios.cross_domain_split(ml100k, ("Drama",), ("Drama", "Comedy"))
