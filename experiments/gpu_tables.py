r"""`allmrec-tables` on a machine that receives the run without stage 1's checkpoint.

The device machine (one GPU, no network, at most 64 MiB per call) cannot receive the run's
stage-1 checkpoint (162 MB: fine-tuned SBERT and its Adam state). The base run's stage-1
item tables (joint, text, cf: what stage 2 reads from stage 1) are exported here to an .npz
and replace that checkpoint there; every variant the tables train (stage-1 ablations,
backbones, the cross-domain source) trains its own stage 1 from the SBERT asset as usual.

  # here: the base run's item tables
  python -m experiments.gpu_tables --config=configs/ml100k_long.py --workdir=runs/ml100k_lora \
      --export_item_tables=item_tables.npz
  # there: launch/tables.py's flags, plus the tables
  python -m experiments.gpu_tables --config=configs/ml100k_long.py --workdir=RUN \
      --item_tables=item_tables.npz --parts=ablations,model_agnostic --users=100

experiments/gpu_tables_bundle.sh packs the bundle and experiments/gpu_tables_run.sh runs this
there. A persistent XLA compilation cache (--compile_cache) lets the variants, which share
their shapes, reuse one another's compiled programs.
"""

from __future__ import annotations

import pathlib

from absl import app
from absl import flags
import jax

from allmrec_jax.trainers import item_tables as item_tables_lib
from experiments import _study_io
from launch import tables as tables_launch

_ITEM_TABLES = flags.DEFINE_string(
    "item_tables", "", "an .npz of the base run's stage-1 item tables (--export_item_tables): "
    "used instead of its stage-1 checkpoint")
_EXPORT = flags.DEFINE_string("export_item_tables", "", "write the base run's stage-1 item "
                              "tables to this .npz and stop")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", "", "persistent XLA compilation cache "
                                     "folder (\"\" = none)")
KEYS = _study_io.ITEM_TABLE_KEYS


def _export(config, workdir: pathlib.Path, path: str) -> None:
  tables = _study_io.save_item_tables(config, workdir, path, KEYS)
  print(f"wrote {path}: " + ", ".join(f"{k} {t.shape}" for k, t in tables.items()))


def _use_item_tables(workdir: pathlib.Path, path: str) -> None:
  """Makes item_tables.item_tables return the .npz tables for `workdir` (checked against
  the dataset's item count); other run folders compute theirs. A missing or malformed file
  fails here, before any model is loaded."""
  saved = _study_io.load_item_tables(path, None, KEYS, flag="item_tables")
  compute = item_tables_lib.item_tables
  base = workdir.resolve()

  def item_tables(config, wd, ds, cf_model, cf_params):
    if pathlib.Path(wd).resolve() != base:
      return compute(config, wd, ds, cf_model, cf_params)
    _study_io.check_item_tables(saved, ds.num_items + 1, f"--item_tables={path}")
    return dict(saved)
  item_tables_lib.item_tables = item_tables


def main(argv):
  if _COMPILE_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  workdir = pathlib.Path(flags.FLAGS.workdir).expanduser()
  if _EXPORT.value:
    _export(tables_launch._CONFIG.value, workdir, _EXPORT.value)  # pylint: disable=protected-access
    return
  if _ITEM_TABLES.value:
    _use_item_tables(workdir, _ITEM_TABLES.value)
  tables_launch.main(argv)


if __name__ == "__main__":
  app.run(main)
