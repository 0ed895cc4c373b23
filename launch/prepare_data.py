r"""Prepares a dataset (read raw -> filter -> split -> candidates -> save) and prints its stats.

Run:
  python launch/prepare_data.py --dataset=ml-100k
  python launch/prepare_data.py --dataset=amazon2018:/data/amazon:Beauty --min_count=4 \
      --rating_threshold=3
  python launch/prepare_data.py --dataset=amazon2023:/data/amazon23:Video_Games --strict
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

import launch
from allmrec_jax.data import prepare
from allmrec_jax.data import raw
from configs import base

_D = base.get_base_config().data
FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", _D.dataset,
                    "ml-100k | atomic:DIR:name | amazon2018:DIR:Category | "
                    "amazon2023:DIR:Category")
flags.DEFINE_string("path", "", "folder of the ml-100k atomic files (default: the asset)")
flags.DEFINE_integer("min_count", _D.min_count, ">=k filter on raw user/item counts")
flags.DEFINE_bool("iterative_kcore", _D.iterative_kcore, "iterate the filter to a fixed "
                  "point")
flags.DEFINE_float("rating_threshold", _D.rating_threshold,
                   "keep interactions with rating >= this (0 = all)")
flags.DEFINE_bool("strict", _D.strict, "stop at the first malformed line (file:line)")
flags.DEFINE_string("data_dir", _D.data_dir, "where processed datasets are written")
flags.DEFINE_string("asset_cache_dir", "", "offline asset cache (default: "
                    "$ALLMREC_CACHE or ~/.cache/allmrec_jax)")
flags.DEFINE_integer("candidate_seed", _D.candidate_seed, "seed of the stored "
                     "evaluation negatives")
flags.DEFINE_enum("description_mode", _D.description_mode, ["first", "join"],
                  "Amazon description lists: first entry (paper) or all joined")
flags.DEFINE_bool("overwrite", False, "reprocess even if the output folder exists")


def data_config_from_flags():
  c = base.get_base_config().data
  c.dataset = FLAGS.dataset
  c.path = FLAGS.path
  c.min_count = FLAGS.min_count
  c.iterative_kcore = FLAGS.iterative_kcore
  c.rating_threshold = FLAGS.rating_threshold
  c.strict = FLAGS.strict
  c.data_dir = FLAGS.data_dir
  c.candidate_seed = FLAGS.candidate_seed
  c.description_mode = FLAGS.description_mode
  return c


def summary(ds, out_dir) -> str:
  """Human-readable statistics of a prepared dataset."""
  s = ds.statistics()
  m = ds.manifest
  lines = [
      f"dataset:        {ds.name} (domain: {ds.domain})",
      f"users:          {s['users']:,}",
      f"items:          {s['items']:,}",
      f"interactions:   {s['interactions']:,}",
      f"avg seq length: {s['avg_seq_len']:.2f}",
      f"density:        {s['density']:.5f}",
      f"eval users:     {ds.eval_users('test').size:,}",
      f"cold users:     {s['cold_users']:,} (raw users with exactly 3 interactions)",
  ]
  skipped = m.get("skipped", {})
  lines.append("skipped lines:  " + (", ".join(f"{k}={v:,}" for k, v in skipped.items())
                                     if skipped else "none"))
  fb = m.get("text_fallbacks", {})
  if fb:
    lines.append("text fallbacks: " + ", ".join(f"{k}={v:,}" for k, v in fb.items()))
  lines.append(f"written to:     {out_dir}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = data_config_from_flags()
  if FLAGS.asset_cache_dir:
    os.environ["ALLMREC_CACHE"] = os.path.expanduser(FLAGS.asset_cache_dir)
  t0 = time.time()
  try:
    ds = prepare.prepare_dataset(cfg, overwrite=FLAGS.overwrite)
  except (raw.DataFormatError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary(ds, prepare.output_dir(cfg)))
  print(f"time:           {time.time() - t0:.2f} s")
  return 0


def run():
  """The `allmrec-prepare` console script."""
  launch.run(main, __name__)


if __name__ == "__main__":
  app.run(main)
