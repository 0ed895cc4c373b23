"""Trains and evaluates A-LLMRec: data -> CF (stage 0) -> stage 1 -> stage 2 -> evaluation.

  python launch/train.py --config=configs/ml100k.py --workdir=runs/ml100k
  python launch/train.py --config=configs/ml100k.py --config.stages=cf --config.cf.model=gru4rec \
      --workdir=runs/gru4rec

Finished stages are restored, interrupted ones resume from their latest checkpoint.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import launch
from allmrec_jax import logging_utils
from allmrec_jax.trainers import runner
from configs import base

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file (configs/ml100k.py, configs/amazon.py, ...); each "
    "field can be overridden as --config.<field>=<value>. The fields, their defaults "
    "(configs/base.py, the paper's values) and meaning:\n" + base.field_help(),
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging_utils.quiet_libraries()
  if os.environ.get("ALLMREC_DISTRIBUTED"):
    jax.distributed.initialize()
  if _CONFIG.value.asset_cache_dir:    # the asset cache every stage reads
    os.environ["ALLMREC_CACHE"] = os.path.expanduser(_CONFIG.value.asset_cache_dir)
  logging.info("JAX devices: %s", jax.devices())
  config = _CONFIG.value
  metrics = runner.train_and_evaluate(config, _WORKDIR.value)
  if "stage2" in str(config.stages):      # the test table of A-LLMRec and its baselines
    print(runner.results_table(
        metrics, [b.strip() for b in str(config.eval.baselines).split(",") if b.strip()],
        f"{config.eval.split}/"))


def run():
  """The `allmrec-train` console script."""
  launch.run(main, __name__)


if __name__ == "__main__":
  app.run(main)
