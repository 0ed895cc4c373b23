"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which
puts this folder on sys.path): the machine load, and running a PyTorch peer (the original
code's computation, a script named by $ALLMREC_TORCH_PEER that prints its result as one
JSON line). The peer is not part of this repository; without it the benchmarks report our
side only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PEER_ENV = "ALLMREC_TORCH_PEER"


def loadavg() -> str:
  """The 1/5/15-minute load averages as a string ('n/a' where /proc is missing)."""
  try:
    with open("/proc/loadavg", encoding="ascii") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def run_peer(args: list[str]) -> dict:
  """Runs `python $ALLMREC_TORCH_PEER ARGS`; its last JSON line (+ "cmd"), or
  {"error", "cmd"} (also when no peer is named)."""
  peer = os.environ.get(PEER_ENV, "")
  if not peer or not os.path.isfile(peer):
    return {"error": f"no PyTorch peer: set {PEER_ENV} to the peer script "
                     f"(got {peer!r})", "cmd": ""}
  cmd = [sys.executable, peer] + list(args)
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
  if out.returncode or not lines:
    return {"error": f"peer exited {out.returncode}: {out.stderr[-800:]}", "cmd": " ".join(cmd)}
  return {**json.loads(lines[-1]), "cmd": " ".join(cmd)}
