"""MovieLens-100K end to end: exact statistics, leave-one-out, stored candidates, reload."""

from __future__ import annotations


import numpy as np

from allmrec_jax.data import candidates
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import prepare
from allmrec_jax.data import sampling

from data_testutil import ml_config  # pylint: disable=g-bad-import-order


def test_exact_statistics(ml100k):
  assert (ml100k.num_users, ml100k.num_items, ml100k.num_interactions) == (943, 1349, 99287)
  assert ml100k.name == "ml-100k" and ml100k.domain == "movies"
  assert ml100k.seq_offsets[-1] == 99287 and ml100k.seq_items.dtype == np.int32
  assert ml100k.item_counts[0] == 0 and ml100k.item_counts.sum() == 99287
  assert ml100k.item_counts[1:].min() >= 5
  assert ml100k.seq_lengths.min() >= 5
  assert ml100k.manifest["preprocess"]["raw_interactions"] == 100000
  assert ml100k.manifest["skipped"] == {}


def test_item_text_and_genres(ml100k):
  # MovieLens item "1" (Toy Story) under its new id
  i = ml100k.item_ids.index("1")
  assert ml100k.titles[i] == "Toy Story"
  assert ml100k.item_text(i) == "Toy Story"              # no description -> title only
  assert ml100k.genres[i] == ["Animation", "Children's", "Comedy"]
  assert ml100k.titles[0] == "" and len(ml100k.titles) == 1350


def test_chronological_order_matches_raw_file(ml100k):
  """User "196" in the raw file, sorted by timestamp (stable), equals its sequence."""
  path = ml100k.manifest["sources"]["ml-100k.inter"]["path"]
  rows = []
  with open(path, encoding="utf-8") as f:
    next(f)
    for line in f:
      u, i, _, t = line.rstrip("\n").split("\t")
      if u == "196":
        rows.append((float(t), i))
  rows.sort(key=lambda r: r[0])                          # stable
  known = set(ml100k.item_ids[1:])
  kept = [i for _, i in rows if i in known]
  assert len(kept) > 30
  # the first user in the file is user 0
  seq = [ml100k.item_ids[j] for j in ml100k.sequence(0)]
  assert seq == kept


def test_leave_one_out(ml100k):
  u = 5
  s = ml100k.sequence(u)
  np.testing.assert_array_equal(ml100k.train_items(u), s[:-2])
  assert ml100k.valid_item(u) == s[-2] and ml100k.test_item(u) == s[-1]
  hv = ml100k.history_matrix("valid", 50)
  ht = ml100k.history_matrix("test", 50)
  assert hv.shape == (943, 50) and hv.dtype == np.int32
  np.testing.assert_array_equal(hv[u, -min(50, s.size - 2):], s[:-2][-50:])
  assert ht[u, -1] == s[-2]                               # test input ends with valid item
  np.testing.assert_array_equal(ml100k.targets("valid")[u], s[-2])
  np.testing.assert_array_equal(ml100k.targets("test")[u], s[-1])
  short = ml100k.seq_lengths.argmin()
  n = ml100k.seq_lengths[short]
  assert (hv[short] > 0).sum() == n - 2                   # left padding
  assert np.all(hv[short, : 50 - (n - 2)] == 0)
  assert ml100k.eval_users("test").size == 943


def test_candidates_never_in_history_and_distinct(ml100k):
  for split in ("valid", "test"):
    for kind, k in (("neg19", 19), ("neg100", 100)):
      c = ml100k.candidates(split, kind)
      assert c.shape == (943, k + 1) and c.dtype == np.int32
      np.testing.assert_array_equal(c[:, 0], ml100k.targets(split))
      neg = c[:, 1:]
      assert neg.min() >= 1 and neg.max() <= 1349
      for u in range(0, 943, 37):
        assert not np.isin(neg[u], ml100k.sequence(u)).any()
        assert np.unique(neg[u]).size == k
  assert not np.array_equal(ml100k.valid_neg19, ml100k.test_neg19)


def test_candidates_seeded(ml100k):
  a = candidates.make_eval_negatives(ml100k.seq_offsets, ml100k.seq_items, 1349, 2024)
  b = candidates.make_eval_negatives(ml100k.seq_offsets, ml100k.seq_items, 1349, 7)
  np.testing.assert_array_equal(a["test_neg19"], ml100k.test_neg19)
  np.testing.assert_array_equal(a["valid_neg100"], ml100k.valid_neg100)
  assert (a["test_neg19"] != b["test_neg19"]).mean() > 0.9


def test_reload_reads_the_cache_and_is_identical(ml100k, tmp_path, monkeypatch):
  cfg = ml_config(tmp_path)
  first = prepare.prepare_dataset(cfg)
  out = prepare.output_dir(cfg)
  assert (out / "manifest.json").is_file()

  def no_rebuild(_):
    raise AssertionError("an unchanged source was processed again")

  with monkeypatch.context() as m:
    m.setattr(prepare, "process", no_rebuild)
    again = prepare.prepare_dataset(cfg)
  for f in ("seq_offsets", "seq_items", "item_counts", "test_neg100", "valid_neg19"):
    np.testing.assert_array_equal(getattr(again, f), getattr(first, f))
    np.testing.assert_array_equal(getattr(again, f), getattr(ml100k, f))
  assert again.titles == ml100k.titles and again.genres == ml100k.genres
  assert again.manifest["sources"]["ml-100k.inter"]["sha256"] == \
      ml100k.manifest["sources"]["ml-100k.inter"]["sha256"]
  # a different option is a different folder
  assert prepare.output_dir(ml_config(tmp_path, min_count=10)) != out
  # npz holds no object arrays
  with np.load(out / dataset_lib.ARRAYS_FILE, allow_pickle=False) as z:
    assert all(z[k].dtype != object for k in z.files)


def test_exclusion_index_sparse_equals_dense(ml100k):
  starts, ends = ml100k.train_bounds()
  idx = sampling.ExclusionIndex.from_ranges(starts, ends, ml100k.seq_items, 1349)
  assert idx.dense is not None
  rng = np.random.default_rng(0)
  u = rng.integers(0, 943, 5000)
  i = rng.integers(1, 1350, 5000)
  dense = idx.contains(u, i)
  idx.dense = None
  np.testing.assert_array_equal(idx.contains(u, i), dense)
  expected = [i[j] in set(ml100k.train_items(u[j]).tolist()) for j in range(200)]
  np.testing.assert_array_equal(dense[:200], expected)
