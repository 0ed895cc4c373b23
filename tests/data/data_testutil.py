"""Helpers of the data tests: data configs and small generated raw files."""

from __future__ import annotations

import gzip
import json

from configs import base


def ml_config(data_dir, **overrides):
  c = base.get_base_config().data
  c.dataset = "ml-100k"
  c.data_dir = str(data_dir)
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def write_gz_lines(path, lines):
  """Writes str (UTF-8 encoded) or bytes lines into a gzip file."""
  with gzip.open(path, "wb") as f:
    for line in lines:
      f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")


def _review(fmt, user, item, rating, ts):
  if fmt == "amazon2018":
    return json.dumps({"reviewerID": user, "asin": item, "overall": rating,
                       "unixReviewTime": ts, "reviewText": "great"})
  return json.dumps({"user_id": user, "parent_asin": item, "rating": rating,
                     "timestamp": ts * 1000, "text": "great"})


def write_amazon(directory, fmt, category="Toys"):
  """Small raw Amazon files in format `fmt` with one line of each failure kind.

  Valid data (min_count=2): users A, B, C keep 2 items each; D (1 review) is filtered.
  Expected skipped: duplicate, malformed_line, non_utf8, missing_field, unknown_item,
  malformed_number (1 each); meta: meta_malformed_line 2 (one an eval attempt).
  """
  key = "asin" if fmt == "amazon2018" else "parent_asin"
  user_key = "reviewerID" if fmt == "amazon2018" else "user_id"
  r = lambda *a: _review(fmt, *a)
  reviews = [
      r("A", "i1", 5.0, 100),
      r("A", "i2", 4.0, 50),
      r("B", "i1", 3.0, 70),
      r("B", "i2", 2.0, 70),
      r("A", "i1", 5.0, 100),                                   # duplicate
      '{"%s": "C", "%s"' % (user_key, key),                      # malformed
      b'{"' + user_key.encode() + b'": "\xff\xfe", "' + key.encode() +
      b'": "i1", "overall": 1, "rating": 1, "unixReviewTime": 1, "timestamp": 1}',
      json.dumps({user_key: "C", "overall": 5.0, "rating": 5.0}),  # missing item / time
      r("C", "zzz", 5.0, 10),                                   # unknown item
      r("C", "i3", 5.0, "abc"),                                 # malformed number
      r("C", "i3", 5.0, 5),
      r("C", "i1", 5.0, 6),
      r("D", "i3", 5.0, 1),
      "",
  ]
  ext = "json.gz" if fmt == "amazon2018" else "jsonl.gz"
  write_gz_lines(directory / f"{category}.{ext}", reviews)
  meta = [
      json.dumps({key: "i1", "title": "Tom &amp; Jerry",
                  "description": ["First &quot;desc&quot;", "Second"],
                  "category": ["Toys", "Kids"], "categories": ["Toys", "Kids"]}),
      # The older loose (Python-literal) metadata format:
      "{'%s': 'i2', 'title': \"Bob's Game\", 'description': 'Plain <b>text</b>'}" % key,
      json.dumps({key: "i3", "description": []}),
      "garbage line",
      "{'%s': __import__('os').system('echo hacked')}" % key,
  ]
  write_gz_lines(directory / f"meta_{category}.{ext}", meta)
  return directory
