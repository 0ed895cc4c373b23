"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which
puts this folder on sys.path): the machine load, and running the PyTorch peer
(`torch_peer.py` in this folder: the original code's computation, which prints its result
as one JSON line). The peer needs torch, sentence-transformers and, for the LLM
sub-commands, `gguf` + `accelerate` (`pip install -e '.[bench]'`); where it cannot run, the
benchmarks report our side and the peer's error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py")


def loadavg() -> str:
  """The 1/5/15-minute load averages as a string ('n/a' where /proc is missing)."""
  try:
    with open("/proc/loadavg", encoding="ascii") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def run_peer(args: list[str]) -> dict:
  """Runs `python torch_peer.py ARGS` (this folder's peer, with this interpreter) and returns
  its last JSON line plus "cmd", or {"error", "cmd"} when it fails or prints no result."""
  cmd = [sys.executable, PEER_SCRIPT] + list(args)
  if not os.path.isfile(PEER_SCRIPT):
    return {"error": f"no PyTorch peer at {PEER_SCRIPT}", "cmd": " ".join(cmd)}
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
  if out.returncode or not lines:
    detail = f"{lines[-1]} {out.stderr[-400:]}" if lines else out.stderr[-800:]
    return {"error": f"peer exited {out.returncode}: {detail}", "cmd": " ".join(cmd)}
  return {**json.loads(lines[-1]), "cmd": " ".join(cmd)}
