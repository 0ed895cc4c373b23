r"""Time of `launch/recommend.py`'s work for one user once the run is loaded.

  .venv/bin/python benchmarks/bench_recommend.py --workdir=runs/ml100k --users=8 --top_k=20

Loads the run (timed apart), then recommends for --users users in turn (CF retrieval of
the top-K over the catalogue, the LLM re-ranking with the soft prompt); the first call
compiles. Prints one JSON line: load seconds, the first call's seconds, and the median and
max of the later calls (the figure the product promises: <= 5 s per user on a 2-core CPU),
with the machine's load average and matmul peaks (peaks.py).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import flags

import bench_common
import peaks

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a finished run folder", required=True)
flags.DEFINE_integer("users", 8, "users recommended for after the first")
flags.DEFINE_integer("top_k", 20, "CF candidates re-ranked by the LLM")
flags.DEFINE_bool("explain", False, "also generate the genre answer")


def main(argv):
  del argv
  from allmrec_jax import recommend  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  load_before = bench_common.loadavg()
  t0 = time.perf_counter()
  config, _ = base.run_config(FLAGS.workdir)
  rec = recommend.Recommender(config, FLAGS.workdir)
  load_s = time.perf_counter() - t0
  times = []
  for u in range(FLAGS.users + 1):
    t = time.perf_counter()
    rec.recommend(user=u, k=FLAGS.top_k, explain=FLAGS.explain)
    times.append(time.perf_counter() - t)
  print(json.dumps({"bench": "recommend", "top_k": FLAGS.top_k, "explain": FLAGS.explain,
                    "load_s": round(load_s, 2), "first_call_s": round(times[0], 2),
                    "per_user_s_median": round(statistics.median(times[1:]), 3),
                    "per_user_s_max": round(max(times[1:]), 3),
                    "loadavg_before": load_before, "loadavg_after": bench_common.loadavg(),
                    "peaks": peaks.machine_peaks()}))


if __name__ == "__main__":
  app.run(main)
