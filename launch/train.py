"""Trains and evaluates A-LLMRec: data -> CF (stage 0) -> stage 1 -> stage 2 -> evaluation.

  python launch/train.py --config=configs/ml100k.py --workdir=runs/ml100k
  python launch/train.py --config=configs/ml100k.py --config.stages=cf --config.cf.model=gru4rec \
      --workdir=runs/gru4rec

Finished stages are restored, interrupted ones resume from their latest checkpoint.
Multi-host (every process runs the same command; each reads its slice of every batch):
  python launch/train.py ... --coordinator_address=host0:1234 --num_processes=4 --process_id=$i
  python launch/train.py ... --distributed          # TPU pods, SLURM: auto-detected
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import launch
from allmrec_jax import config_lib
from allmrec_jax import host_memory
from allmrec_jax import logging_utils
from allmrec_jax import run_lock
from allmrec_jax.trainers import reporting
from allmrec_jax.trainers import runner
from configs import base

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file (configs/ml100k.py, configs/amazon.py, ...); each "
    "field can be overridden as --config.<field>=<value>. The fields, their defaults "
    "(configs/base.py, the paper's values) and meaning:\n" + base.field_help(),
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host runs: host:port of process 0; with it every "
    "process calls jax.distributed.initialize (on TPU pods and SLURM/Open MPI clusters "
    "pass --distributed alone: JAX finds the coordinator itself).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-host runs: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-host runs: this process's index (0 = coordinator).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                                 "with the cluster's auto-detected settings.")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
  """jax.distributed.initialize from the flags (nothing for a single-process run)."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go "
                           "together")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host_memory.reexec_with_huge_pages()   # first: it restarts the process once
  logging_utils.quiet_libraries()
  init_distributed()
  if _CONFIG.value.asset_cache_dir:    # the asset cache every stage reads
    os.environ["ALLMREC_CACHE"] = os.path.expanduser(_CONFIG.value.asset_cache_dir)
  # One writer per run folder (allmrec_jax/run_lock.py): process 0 holds workdir/run.lock.
  with run_lock.writer("allmrec-train", _WORKDIR.value, enabled=jax.process_index() == 0):
    logging.info("JAX devices: %s", jax.devices())
    config = _CONFIG.value
    metrics = runner.train_and_evaluate(config, _WORKDIR.value)
    if "stage2" in config_lib.as_list(config.stages):   # A-LLMRec and its baselines
      baselines = config_lib.as_list(config.eval.baselines)
      prefix = f"{config.eval.split}/"
      print(reporting.results_table(metrics, baselines, prefix))
      print(reporting.reading(metrics, baselines, prefix, config))


def run():
  """The `allmrec-train` console script."""
  launch.run(main, __name__)


if __name__ == "__main__":
  app.run(main)
