r"""Data benchmark: preprocessing throughput and CF-pipeline batches per second.

1. Writes a synthetic Amazon-2018-format review file (default 1M reviews, realistic line
   length) + metadata, then times reading + preprocessing it (target >= 100k reviews/s).
2. Times the CF training pipeline (grain iterator, batch 128, maxlen 50) on MovieLens-100K
   and on the synthetic Amazon data (target >= 500 batches/s).

Run:
  python benchmarks/bench_data.py [--num_reviews=1000000] [--workdir=/tmp/allmrec_bench]
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import resource
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from allmrec_jax.data import amazon  # pylint: disable=g-import-not-at-top,wrong-import-position
from allmrec_jax.data import pipelines  # pylint: disable=g-import-not-at-top,wrong-import-position
from allmrec_jax.data import prepare  # pylint: disable=g-import-not-at-top,wrong-import-position
from allmrec_jax.data import preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer("num_reviews", 1_000_000, "reviews in the synthetic file")
flags.DEFINE_integer("num_users", 120_000, "synthetic users")
flags.DEFINE_integer("num_items", 30_000, "synthetic items")
flags.DEFINE_string("workdir", "/tmp/allmrec_bench", "where the synthetic files go")
flags.DEFINE_integer("batches", 2000, "CF batches to time")
FLAGS = flags.FLAGS

_TEXT = ("I bought this for my daughter and she loves it. Works exactly as described, "
         "arrived on time and the quality is better than I expected for the price. "
         "Would recommend to anyone looking for something similar.")


def write_synthetic(directory: pathlib.Path, n: int, num_users: int, num_items: int,
                    seed: int = 0) -> pathlib.Path:
  """Amazon-2018 `Bench.json.gz` + `meta_Bench.json.gz` with Zipf-like popularity."""
  directory.mkdir(parents=True, exist_ok=True)
  reviews = directory / "Bench.json.gz"
  if reviews.exists() and (directory / f".n{n}").exists():
    return directory
  rng = np.random.default_rng(seed)
  pu = 1.0 / (np.arange(num_users) + 20.0)             # heavy-tailed activity
  pi = (np.arange(num_items) + 5.0) ** -0.9              # heavy-tailed popularity
  users = rng.permutation(num_users)[rng.choice(num_users, n, p=pu / pu.sum())]
  items = rng.permutation(num_items)[rng.choice(num_items, n, p=pi / pi.sum())]
  times = rng.integers(1_300_000_000, 1_540_000_000, n)
  ratings = rng.integers(1, 6, n)
  with gzip.open(reviews, "wt", encoding="utf-8", compresslevel=1) as f:
    for u, i, t, r in zip(users.tolist(), items.tolist(), times.tolist(),
                          ratings.tolist()):
      f.write('{"overall": %d.0, "verified": true, "reviewTime": "01 1, 2015", '
              '"reviewerID": "A%09d", "asin": "B%09d", "reviewerName": "Someone", '
              '"reviewText": "%s", "summary": "Five Stars", "unixReviewTime": %d}\n'
              % (r, u, i, _TEXT, t))
  with gzip.open(directory / "meta_Bench.json.gz", "wt", encoding="utf-8",
                 compresslevel=1) as f:
    for i in range(num_items):
      f.write(json.dumps({"asin": "B%09d" % i, "title": f"Product {i} &amp; more",
                          "description": [f"Description of product {i}.", "More."],
                          "category": ["Bench", "Things"]}) + "\n")
  (directory / f".n{n}").touch()
  return directory


def bench_preprocessing(directory: pathlib.Path, n: int) -> dict:
  """Wall and CPU (process) time: on a shared machine the CPU figure is what a quiet
  machine would show."""
  t0, c0 = time.perf_counter(), time.process_time()
  r = amazon.read_amazon2018(directory, "Bench")
  t_read = time.perf_counter() - t0
  t1 = time.perf_counter()
  seqs = preprocess.make_sequences(r, min_count=5)
  t_pre = time.perf_counter() - t1
  cpu = time.process_time() - c0
  c = base.get_base_config().data
  c.dataset = f"amazon2018:{directory}:Bench"
  c.data_dir = str(directory / "processed")
  t2 = time.perf_counter()
  ds = prepare.prepare_dataset(c, overwrite=True)
  t_full = time.perf_counter() - t2
  return {
      "reviews": n,
      "read_s": round(t_read, 2),
      "filter_sort_s": round(t_pre, 2),
      "reviews_per_s_read_and_preprocess": int(n / (t_read + t_pre)),
      "reviews_per_cpu_s_read_and_preprocess": int(n / cpu),
      "load_average_1min": round(os.getloadavg()[0], 2),
      "full_prepare_s (read+filter+candidates+save)": round(t_full, 2),
      "reviews_per_s_full_prepare": int(n / t_full),
      "kept": seqs.stats,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
      "dataset": ds,
  }


def bench_pipeline(ds, batches: int, batch_size: int = 128, maxlen: int = 50,
                   prefetch: int = 16) -> dict:
  d = pipelines.cf_train_dataset(ds, batch_size=batch_size, maxlen=maxlen, seed=0,
                                 num_epochs=10_000, process_index=0, process_count=1)
  n = min(batches, len(d) - 1)
  it = pipelines.make_iterator(d, prefetch=prefetch)
  next(it)
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  dt = time.perf_counter() - t0
  t1, c1 = time.perf_counter(), time.process_time()
  for g in range(n):
    d[g]
  direct = time.perf_counter() - t1
  cpu = time.process_time() - c1
  return {"batches": n, "batches_per_s_iterator": int(n / dt),
          "batches_per_s_direct": int(n / direct),
          "batches_per_cpu_s_direct": int(n / cpu),
          "load_average_1min": round(os.getloadavg()[0], 2)}


def main(argv):
  del argv
  work = pathlib.Path(FLAGS.workdir)
  t0 = time.perf_counter()
  write_synthetic(work / "amazon", FLAGS.num_reviews, FLAGS.num_users, FLAGS.num_items)
  print(f"synthetic file ready in {time.perf_counter() - t0:.1f} s "
        f"({(work / 'amazon' / 'Bench.json.gz').stat().st_size / 2**20:.0f} MiB gz)")
  pre = bench_preprocessing(work / "amazon", FLAGS.num_reviews)
  amazon_ds = pre.pop("dataset")
  print("preprocessing:", json.dumps(pre, indent=1))
  c = base.get_base_config().data
  c.data_dir = str(work / "processed")
  ml = prepare.prepare_dataset(c)
  print("CF pipeline, ml-100k:", bench_pipeline(ml, FLAGS.batches))
  print("CF pipeline, synthetic amazon (%d users, %d items):" % (
      amazon_ds.num_users, amazon_ds.num_items), bench_pipeline(amazon_ds, FLAGS.batches))


if __name__ == "__main__":
  app.run(main)
