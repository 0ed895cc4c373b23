"""Trains and evaluates A-LLMRec: data -> CF (stage 0) -> stage 1 -> stage 2 -> evaluation.

  python launch/train.py --config=configs/ml100k.py --workdir=runs/ml100k
  python launch/train.py --config=configs/ml100k.py --config.stages=cf --config.cf.model=gru4rec \
      --workdir=runs/gru4rec

Finished stages are restored, interrupted ones resume from their latest checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from allmrec_jax import logging_utils
from allmrec_jax.trainers import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging_utils.quiet_libraries()
  if os.environ.get("ALLMREC_DISTRIBUTED"):
    jax.distributed.initialize()
  logging.info("JAX devices: %s", jax.devices())
  pipeline.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
