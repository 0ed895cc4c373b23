"""grain pipelines: SASRec-equal arrays, valid negatives, determinism, resumption, sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allmrec_jax.data import pipelines

MAXLEN = 20


def _sasrec_reference(train: np.ndarray, maxlen: int):
  """seq/pos the way SASRec's sampler fills them: walk train[:-1] backwards from the end."""
  seq = np.zeros(maxlen, np.int32)
  pos = np.zeros(maxlen, np.int32)
  nxt, idx = train[-1], maxlen - 1
  for i in train[:-1][::-1]:
    seq[idx], pos[idx] = i, nxt
    nxt, idx = i, idx - 1
    if idx == -1:
      break
  return seq, pos


def _cf(ds, **kw):
  args = dict(batch_size=32, maxlen=MAXLEN, seed=3, num_epochs=2, process_index=0,
              process_count=1)
  args.update(kw)
  return pipelines.cf_train_dataset(ds, **args)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_cf_batch_matches_sasrec_sampler(ml100k):
  d = _cf(ml100k)
  assert len(d) == 2 * (943 // 32)
  b = d[0]
  assert b["seq"].shape == (32, MAXLEN) and b["seq"].dtype == np.int32
  assert b["neg"].dtype == np.int32 and b["mask"].dtype == np.float32
  for r, u in enumerate(b["user"]):
    train = ml100k.train_items(int(u))
    seq, pos = _sasrec_reference(train, MAXLEN)
    np.testing.assert_array_equal(b["seq"][r], seq)
    np.testing.assert_array_equal(b["pos"][r], pos)
    neg = b["neg"][r]
    np.testing.assert_array_equal(neg > 0, pos > 0)
    assert not np.isin(neg[neg > 0], train).any()
  # a user with a short history is left-padded (MovieLens min length 5 -> 3 train items)
  short = int(np.argmin(ml100k.seq_lengths))
  one = pipelines.cf_batch(ml100k, np.array([short]), maxlen=MAXLEN, seed=0, epoch=0)
  seq, pos = _sasrec_reference(ml100k.train_items(short), MAXLEN)
  np.testing.assert_array_equal(one["seq"][0], seq)
  np.testing.assert_array_equal(one["pos"][0], pos)


def test_negatives_never_in_history_across_many_batches(ml100k):
  d = _cf(ml100k, batch_size=128, maxlen=50)
  index = pipelines.train_exclusion_index(ml100k)
  total = 0
  for g in range(len(d)):
    b = d[g]
    hit = index.contains(b["user"][:, None], b["neg"]) & (b["pos"] > 0)
    assert not hit.any()
    total += int((b["neg"] > 0).sum())
  assert total > 50_000


def test_determinism_and_seeds(ml100k):
  a, b = _cf(ml100k), _cf(ml100k)
  assert _equal(a[5], b[5])
  c = _cf(ml100k, seed=4)
  assert not np.array_equal(a[5]["user"], c[5]["user"])
  # same users in another epoch get other negatives (and another order)
  spe = len(a) // 2
  e0 = pipelines.cf_batch(ml100k, a[0]["user"], maxlen=MAXLEN, seed=3, epoch=0)
  e1 = pipelines.cf_batch(ml100k, a[0]["user"], maxlen=MAXLEN, seed=3, epoch=1)
  np.testing.assert_array_equal(e0["neg"], a[0]["neg"])
  assert (e0["neg"] != e1["neg"])[e0["pos"] > 0].mean() > 0.9
  assert not np.array_equal(a[0]["user"], a[spe]["user"])
  # every eligible user appears exactly once per epoch (drop_remainder drops the tail)
  users = np.concatenate([a[g]["user"] for g in range(spe)])
  assert np.unique(users).size == users.size == spe * 32


def test_mid_epoch_resumption_is_identical(ml100k):
  d = _cf(ml100k)
  it = pipelines.make_iterator(d, prefetch=4)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))     # what a checkpoint stores
  rest = [next(it) for _ in range(5)]
  # a fresh pipeline (new process, say) restored from the saved state
  it2 = pipelines.make_iterator(_cf(ml100k), prefetch=0)
  it2.set_state(state)
  for expected in rest:
    assert _equal(next(it2), expected)


def test_per_host_sharding_partitions_the_global_batch(ml100k):
  full = _cf(ml100k, batch_size=64)[3]
  parts = [_cf(ml100k, batch_size=64, process_index=p, process_count=2)[3]
           for p in range(2)]
  for k in full:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
  with pytest.raises(ValueError, match="not divisible"):
    _cf(ml100k, batch_size=63, process_count=2, process_index=0)


def test_no_drop_remainder_pads_with_mask(ml100k):
  d = _cf(ml100k, batch_size=100, num_epochs=1, drop_remainder=False)
  assert len(d) == 10
  last = d[9]
  assert last["seq"].shape == (100, MAXLEN)
  assert last["mask"].sum() == 43 and np.all(last["mask"][:43] == 1)
  users = np.concatenate([d[g]["user"][d[g]["mask"] > 0] for g in range(10)])
  assert np.array_equal(np.sort(users), np.arange(943))


def test_few_users_subset(ml100k):
  users = np.array([3, 10, 500, 7])
  d = _cf(ml100k, batch_size=2, users=users)
  assert len(d) == 4
  assert sorted(np.concatenate([d[0]["user"], d[1]["user"]]).tolist()) == [3, 7, 10, 500]


def test_stage1_examples(ml100k):
  d = pipelines.stage1_dataset(ml100k, batch_size=16, maxlen=MAXLEN, seed=0,
                               process_index=0, process_count=1)
  b = d[0]
  assert b["pos"].shape == (16,) and b["neg"].shape == (16,)
  for r, u in enumerate(b["user"]):
    train = ml100k.train_items(int(u))
    assert b["pos"][r] == train[-1]
    np.testing.assert_array_equal(b["seq"][r][-min(MAXLEN, train.size - 1):],
                                  train[:-1][-MAXLEN:])
    assert b["neg"][r] not in train and b["neg"][r] > 0


def test_stage2_examples_and_candidates_of_the_trainer(ml100k):
  """trainers/stage2's data path: examples at the last P training positions, candidate sets
  of the target + distinct negatives outside the user's history, shuffled, keyed by (seed,
  epoch, example id) only (a resumed epoch draws the same sets)."""
  from allmrec_jax.trainers import stage2  # pylint: disable=g-import-not-at-top
  ex = stage2.training_examples(ml100k, maxlen=MAXLEN, num_history=10, positions_per_user=2)
  assert ex.users.size == 2 * ml100k.num_users          # every ml-100k user has >= 3 items
  for x in (0, 5, ml100k.num_users + 5):                 # first and second position
    u, k = int(ex.users[x]), 1 + x // ml100k.num_users
    train = ml100k.train_items(u)
    assert ex.targets[x] == train[-k]
    np.testing.assert_array_equal(ex.seq[x][-min(MAXLEN, train.size - k):],
                                  train[:-k][-MAXLEN:])
    np.testing.assert_array_equal(ex.history[x], ex.seq[x][-10:])
  index = pipelines.train_exclusion_index(ml100k)
  ids = np.arange(0, 64)
  c = stage2.sample_candidates(ml100k, index, ex.users[ids], ex.targets[ids], ids, 20,
                               seed=0, epoch=0)
  assert c.shape == (64, 20) and c.dtype == np.int32
  cols = []
  for r, x in enumerate(ids):
    train = ml100k.train_items(int(ex.users[x]))
    assert np.unique(c[r]).size == 20 and (c[r] == ex.targets[x]).sum() == 1
    assert not np.isin(c[r][c[r] != ex.targets[x]], train).any()
    cols.append(int(np.flatnonzero(c[r] == ex.targets[x])[0]))
  assert len(set(cols)) > 5                               # the target's column is shuffled
  np.testing.assert_array_equal(c[10:20], stage2.sample_candidates(
      ml100k, index, ex.users[ids[10:20]], ex.targets[ids[10:20]], ids[10:20], 20, seed=0,
      epoch=0))                                           # a batch's sets: ids, not position
  assert not np.array_equal(c, stage2.sample_candidates(
      ml100k, index, ex.users[ids], ex.targets[ids], ids, 20, seed=0, epoch=1))
  order = stage2.epoch_order(ex.users.size, 0, 3)
  np.testing.assert_array_equal(np.sort(order), np.arange(ex.users.size))
  np.testing.assert_array_equal(order, stage2.epoch_order(ex.users.size, 0, 3))
