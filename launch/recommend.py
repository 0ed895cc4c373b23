r"""Recommends items for one user with a finished run: CF top-K of the catalogue, re-ranked
by the LLM with A-LLMRec's soft prompt.

  python launch/recommend.py --workdir=runs/ml100k --user=42
  python launch/recommend.py --workdir=runs/ml100k \
      --history="Star Wars (1977);Fargo (1996);Contact (1997)" --top_k=10 --explain

The run folder's own config (config.json) is used. `--user` takes a user index of the
dataset (its whole sequence is the history); `--history` takes known item titles separated
by ";". Prints the ranked titles with the LLM score (log-likelihood of the title as the
answer), the CF score and CF rank; `--explain` adds the LLM's answer to the paper's genre
question; `--json` prints one JSON object instead.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

from absl import app
from absl import flags
from absl import logging

import launch
from allmrec_jax import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a run folder of launch/train.py with cf, stage1 and "
                    "stage2 finished")
flags.DEFINE_integer("user", None, "user index of the run's dataset")
flags.DEFINE_string("history", None, "known item titles separated by ';' (instead of --user)")
flags.DEFINE_integer("top_k", 20, "candidates the CF model retrieves for the LLM to re-rank")
flags.DEFINE_bool("explain", False, "also generate the genre answer for the user")
flags.DEFINE_bool("json", False, "print one JSON object")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host_memory.reexec_with_huge_pages()   # first: it restarts the process once
  if (FLAGS.user is None) == (FLAGS.history is None):
    raise app.UsageError("pass exactly one of --user and --history")
  history = None
  if FLAGS.history is not None:
    history = [t for t in FLAGS.history.split(";") if t.strip()]
    if not history:
      raise app.UsageError("--history has no titles (separate them with ';')")
  from allmrec_jax import logging_utils  # pylint: disable=import-outside-toplevel
  from allmrec_jax import recommend  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  logging_utils.quiet_libraries()
  try:
    recommend.check_run(pathlib.Path(FLAGS.workdir).expanduser())
    config, dropped = base.run_config(FLAGS.workdir)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  if dropped:
    logging.warning("%s/config.json: fields unknown to this version ignored: %s",
                    FLAGS.workdir, ", ".join(dropped))
  t0 = time.perf_counter()
  rec = recommend.Recommender(config, FLAGS.workdir)
  t1 = time.perf_counter()
  try:
    ans = rec.recommend(user=FLAGS.user, history=history, k=FLAGS.top_k,
                        explain=FLAGS.explain)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info("loaded in %.1f s; recommended in %.2f s", t1 - t0, time.perf_counter() - t1)
  if FLAGS.json:
    print(json.dumps({"history": ans.history, "explanation": ans.explanation,
                      "items": [dataclasses.asdict(r) for r in ans.items]}, ensure_ascii=False))
    return
  print("history (prompt): " + "; ".join(ans.history))
  print(f"{'#':>3}  {'LLM score':>9}  {'CF score':>8}  {'CF #':>4}  title")
  for i, r in enumerate(ans.items, 1):
    print(f"{i:>3}  {r.llm_score:9.3f}  {r.cf_score:8.3f}  {r.cf_rank:>4}  {r.title}")
  if ans.explanation is not None:
    print("genres: " + ans.explanation)


def run():
  """The `allmrec-recommend` console script."""
  launch.run(main, __name__)


if __name__ == "__main__":
  app.run(main)
