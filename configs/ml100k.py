"""Embedded default: MovieLens-100K + all-MiniLM-L6-v2 + SmolLM2-135M-Instruct, on a CPU.

Run:
  python launch/train.py --config=configs/ml100k.py --workdir=runs/ml100k
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.data.dataset = "ml-100k"
  return c
