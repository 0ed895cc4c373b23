"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which
puts this folder on sys.path): the machine load, and running a PyTorch peer of
`../shared/bench/peer_torch.py` that prints its result as one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

PEER = "/work/shared/bench/peer_torch.py"


def loadavg() -> str:
  """The 1/5/15-minute load averages as a string ('n/a' where /proc is missing)."""
  try:
    with open("/proc/loadavg", encoding="ascii") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def run_peer(args: list[str]) -> dict:
  """Runs `python peer_torch.py ARGS`; its last JSON line (+ "cmd"), or {"error", "cmd"}."""
  cmd = [sys.executable, PEER] + list(args)
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
  if out.returncode or not lines:
    return {"error": f"peer exited {out.returncode}: {out.stderr[-800:]}", "cmd": " ".join(cmd)}
  return {**json.loads(lines[-1]), "cmd": " ".join(cmd)}
