"""Command-line entry points: the console scripts allmrec-train, allmrec-prepare and
allmrec-generate, or `python launch/<name>.py`."""

import sys

from absl import app
from absl import flags


def run(main, module_name: str):
  """app.run(main), with `module_name`'s flags shown by --help also when it runs as a
  console script (absl's --help lists the flags of the module named by sys.argv[0])."""
  fv = flags.FLAGS
  for f in fv.get_key_flags_for_module(module_name):
    fv.register_key_flag_for_module(sys.argv[0], f)
  app.run(main)
