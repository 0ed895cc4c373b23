"""Raw readers and preprocessing on small generated files in every supported format."""

from __future__ import annotations

import numpy as np
import pytest

from allmrec_jax.data import amazon
from allmrec_jax.data import atomic
from allmrec_jax.data import prepare
from allmrec_jax.data import preprocess
from allmrec_jax.data import raw
from configs import base

from data_testutil import write_amazon  # pylint: disable=g-bad-import-order
from data_testutil import write_gz_lines  # pylint: disable=g-bad-import-order

EXPECTED_SKIPS = {"duplicate": 1, "malformed_line": 1, "non_utf8": 1, "missing_field": 1,
                  "unknown_item": 1, "malformed_number": 1, "meta_malformed_line": 2}


def _cfg(fmt, directory, tmp_path, **kw):
  c = base.get_base_config().data
  c.dataset = f"{fmt}:{directory}:Toys"
  c.data_dir = str(tmp_path / "processed")
  c.min_count = 2
  for k, v in kw.items():
    setattr(c, k, v)
  return c


@pytest.mark.parametrize("fmt", ["amazon2018", "amazon2023"])
def test_amazon_reader_end_to_end(fmt, tmp_path):
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  write_amazon(raw_dir, fmt)
  ds = prepare.prepare_dataset(_cfg(fmt, raw_dir, tmp_path))
  assert (ds.num_users, ds.num_items, ds.num_interactions) == (3, 3, 6)
  # items renumbered by first appearance among kept lines: i1 -> 1, i2 -> 2, i3 -> 3
  assert ds.item_ids == ("", "i1", "i2", "i3")
  # chronological; B's two items share a timestamp, so file order decides
  assert ds.sequence(0).tolist() == [2, 1]          # A: i2 (t=50), i1 (t=100)
  assert ds.sequence(1).tolist() == [1, 2]          # B: tie -> file order
  assert ds.sequence(2).tolist() == [3, 1]          # C: i3 (t=5), i1 (t=6)
  assert ds.titles == ["", "Tom & Jerry", "Bob's Game", "No Title"]
  assert ds.descriptions == ["", 'First "desc"', "Plain <b>text</b>", ""]
  assert ds.item_text(1) == 'Tom & Jerry, First "desc"'
  assert ds.item_text(3) == "No Title"
  assert ds.genres[1] == ["Toys", "Kids"]
  assert ds.manifest["skipped"] == EXPECTED_SKIPS
  assert ds.manifest["text_fallbacks"] == {"no_title": 1, "no_description": 1}
  assert ds.domain == "items"
  assert len(ds.manifest["sources"]) == 2
  for src in ds.manifest["sources"].values():
    assert src["sha256"] == raw.sha256_file(src["path"])


def test_amazon_options(tmp_path):
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  write_amazon(raw_dir, "amazon2018")
  joined = prepare.process(_cfg("amazon2018", raw_dir, tmp_path, description_mode="join"))
  assert joined.descriptions[1] == 'First "desc" Second'
  # iterative k-core: D removed -> i3 has 1 -> C has 1 -> only A and B remain
  core = prepare.process(_cfg("amazon2018", raw_dir, tmp_path, iterative_kcore=True))
  assert (core.num_users, core.num_items, core.num_interactions) == (2, 2, 4)
  # rating >= 4: A(i1, i2), C(i3, i1), D(i3); then i2 has 1 -> A keeps i1 only
  rated = prepare.process(_cfg("amazon2018", raw_dir, tmp_path, rating_threshold=4.0))
  assert [rated.sequence(u).tolist() for u in range(rated.num_users)] == [[1], [2, 1]]
  assert rated.item_ids == ("", "i1", "i3")


def test_amazon_strict_stops_with_file_and_line(tmp_path):
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  write_amazon(raw_dir, "amazon2018")
  with pytest.raises(raw.DataFormatError, match=r"meta_Toys\.json\.gz:4: meta_malformed"):
    amazon.read_amazon2018(raw_dir, "Toys", strict=True)


def test_amazon_errors_name_the_file(tmp_path):
  with pytest.raises(raw.DataFormatError, match=r"Beauty\.json\.gz: file not found"):
    amazon.read_amazon2018(tmp_path, "Beauty")
  write_gz_lines(tmp_path / "Beauty.json.gz", ["not json"])
  write_gz_lines(tmp_path / "meta_Beauty.json.gz", ['{"asin": "x", "title": "t"}'])
  with pytest.raises(raw.DataFormatError, match=r"Beauty\.json\.gz: no valid review"):
    amazon.read_amazon2018(tmp_path, "Beauty")
  (tmp_path / "Games.json.gz").write_bytes(b"this is not gzip")
  write_gz_lines(tmp_path / "meta_Games.json.gz", ['{"asin": "x", "title": "t"}'])
  with pytest.raises(raw.DataFormatError, match=r"Games\.json\.gz:1: unreadable gzip"):
    amazon.read_amazon2018(tmp_path, "Games")


def test_empty_after_filter_is_one_line_error(tmp_path):
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  write_amazon(raw_dir, "amazon2023")
  with pytest.raises(raw.DataFormatError, match="no interaction left after the >=50"):
    prepare.process(_cfg("amazon2023", raw_dir, tmp_path, min_count=50))


def test_domain_names():
  assert prepare.domain_of("amazon2018", "Movies_and_TV") == "movies"
  assert prepare.domain_of("amazon2023", "Video_Games") == "games"
  assert prepare.domain_of("amazon2018", "Beauty") == "items"
  assert prepare.domain_of("atomic", "ml-1m") == "movies"


def test_atomic_reader(tmp_path):
  (tmp_path / "tiny.inter").write_bytes(
      b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
      b"u1\t10\t4\t3\n"
      b"u1\t11\t5\t1\n"
      b"u2\t10\t3\t2\n"
      b"u2\t11\tbad\t2\n"          # malformed number
      b"u2\t12\n"                  # wrong field count
      b"u3\t99\t1\t1\n"            # unknown item
      b"u\xff\t10\t1\t1\n")        # non-UTF-8
  (tmp_path / "tiny.item").write_text(
      "item_id:token\tmovie_title:token_seq\tclass:token_seq\n"
      "10\tAlien &amp; Co\tSci-Fi Horror\n11\tHeat\tAction\n12\tUp\tAnimation\n",
      encoding="utf-8")
  r = atomic.read_atomic(tmp_path, "tiny")
  assert r.skipped.as_dict() == {"malformed_line": 1, "malformed_number": 1,
                                 "non_utf8": 1, "unknown_item": 1}
  assert r.item_text["10"].title == "Alien & Co"
  assert r.item_text["10"].genres == ["Sci-Fi", "Horror"]
  s = preprocess.make_sequences(r, min_count=1)
  assert s.item_keys == ["", "10", "11"]
  np.testing.assert_array_equal(s.seq_offsets, [0, 2, 3])
  np.testing.assert_array_equal(s.seq_items, [2, 1, 1])   # u1 sorted by time: 11, 10
  with pytest.raises(raw.DataFormatError, match=r"tiny\.inter:5: malformed_number"):
    atomic.read_atomic(tmp_path, "tiny", strict=True)
  with pytest.raises(raw.DataFormatError, match=r"nope\.inter: file not found"):
    atomic.read_atomic(tmp_path, "nope")


def test_cold_users_from_raw_data():
  """Users with exactly 3 raw interactions are kept aside when all 3 items survive."""
  b = raw.InteractionBuilder()
  for u in ("w1", "w2", "w3", "w4"):     # warm users: 4 items each
    for t, i in enumerate(("a", "b", "c", "d")):
      b.add(u, i, float(t), 5.0)
  b.add("cold", "c", 3.0, 5.0)           # 3 interactions, out of time order in the file
  b.add("cold", "a", 1.0, 5.0)
  b.add("cold", "b", 2.0, 5.0)
  b.add("gone", "a", 1.0, 5.0)           # 3 interactions, one with an unknown item
  b.add("gone", "b", 2.0, 5.0)
  b.add("gone", "zz", 3.0, 5.0)
  r = b.finish({}, raw.SkipCounter(), {})
  s = preprocess.make_sequences(r, min_count=4)
  assert s.stats["users"] == 4 and s.stats["items"] == 4
  # items renumbered a->1, b->2, c->3, d->4; cold user chronological: a, b, c
  np.testing.assert_array_equal(s.cold_user_items, [[1, 2, 3]])
  assert s.stats["cold_users_with_unknown_items"] == 1
  # k=3 keeps "cold" and part of "gone": a cold user is one the filter removed entirely
  s3 = preprocess.make_sequences(r, min_count=3)
  assert s3.cold_user_items.shape == (0, 3) and s3.stats["users"] == 6


def test_strict_stops_at_a_duplicate(tmp_path):
  rows = [("A", "i1", 1), ("B", "i1", 2), ("A", "i1", 3)]
  write_gz_lines(tmp_path / "Toys.jsonl.gz", [
      '{"user_id": "%s", "parent_asin": "%s", "rating": 5, "timestamp": %d}' % r
      for r in rows])
  write_gz_lines(tmp_path / "meta_Toys.jsonl.gz", ['{"parent_asin": "i1", "title": "x"}'])
  r = amazon.read_amazon2023(tmp_path, "Toys", strict=True)
  np.testing.assert_array_equal(r.linenos, [1, 2, 3])
  with pytest.raises(raw.DataFormatError,
                     match=r"Toys\.jsonl\.gz:3: duplicate \(user A, item i1\)"):
    preprocess.make_sequences(r, min_count=1)
  relaxed = amazon.read_amazon2023(tmp_path, "Toys")
  assert preprocess.make_sequences(relaxed, min_count=1).stats["interactions"] == 2
  assert relaxed.skipped.as_dict() == {"duplicate": 1}


def test_prepared_cache_follows_raw_changes_and_strict(tmp_path):
  """A raw file replaced after preparing is noticed (size/mtime, then sha256) and the data
  prepared again; --strict is part of the cache key; a corrupt cache names its file."""
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  write_amazon(raw_dir, "amazon2018")
  cfg = _cfg("amazon2018", raw_dir, tmp_path)
  first = prepare.prepare_dataset(cfg)
  assert first.num_users == 3
  assert prepare.output_dir(cfg) != prepare.output_dir(_cfg("amazon2018", raw_dir, tmp_path,
                                                             strict=True))
  # Touching a file without changing it keeps the cache (the sha256 still matches).
  reviews = raw_dir / "Toys.json.gz"
  st = reviews.stat()
  os.utime(reviews, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert prepare.changed_sources(prepare.prepare_dataset(cfg).manifest) == []
  # A new user E with two reviews: the cache is rebuilt.
  shutil.copy(reviews, tmp_path / "old.gz")
  import gzip  # pylint: disable=g-import-not-at-top
  with gzip.open(tmp_path / "old.gz", "rt", encoding="utf-8", errors="replace") as f:
    lines = f.read().splitlines()
  lines += ['{"reviewerID": "E", "asin": "i1", "overall": 5.0, "unixReviewTime": 7}',
            '{"reviewerID": "E", "asin": "i2", "overall": 5.0, "unixReviewTime": 8}']
  write_gz_lines(reviews, lines)
  again = prepare.prepare_dataset(cfg)
  assert again.num_users == 4
  assert prepare.changed_sources(again.manifest) == []
  # A corrupt cache: one line naming the file and the way out.
  out = prepare.output_dir(cfg)
  (out / "arrays.npz").write_bytes((out / "arrays.npz").read_bytes()[:100])
  with pytest.raises(ValueError, match=r"arrays\.npz: corrupt processed dataset .*--overwrite"):
    prepare.prepare_dataset(cfg)
  assert prepare.prepare_dataset(cfg, overwrite=True).num_users == 4
  (out / "dataset.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"dataset\.json: corrupt processed dataset"):
    prepare.prepare_dataset(cfg)


def test_amazon_title_of_wrong_type_is_counted_not_stringified(tmp_path):
  """A title that is an object, a number or a list is no title: counted as meta_bad_title
  (the item keeps its interactions with an empty title); --strict names file:line."""
  meta = ['{"asin": "a", "title": {"x": 1}}', '{"asin": "b", "title": 42}',
          '{"asin": "c", "title": ["t"]}', '{"asin": "d", "title": "Good"}',
          '{"asin": "e"}']
  write_gz_lines(tmp_path / "meta_Toys.json.gz", meta)
  fmt = amazon._FORMATS["amazon2018"]  # pylint: disable=protected-access
  skipped = raw.SkipCounter()
  out = amazon.read_meta(str(tmp_path / "meta_Toys.json.gz"), fmt, skipped, "first")
  assert {k: v.title for k, v in out.items()} == {"a": "", "b": "", "c": "", "d": "Good",
                                                  "e": ""}
  assert skipped.as_dict() == {"meta_bad_title": 3}
  with pytest.raises(raw.DataFormatError, match=r"meta_Toys\.json\.gz:1: meta_bad_title "
                                                r"\(title is a dict\)"):
    amazon.read_meta(str(tmp_path / "meta_Toys.json.gz"), fmt, raw.SkipCounter(strict=True),
                     "first")
