r"""Kill anywhere, resume, compare: the whole pipeline under SIGKILL (or, with
--signal=TERM, a scheduler's SIGTERM; --signal=TERM,KILL alternates them) at random points.

  .venv/bin/python tests/kill_resume.py --out=/tmp/kill_resume --kills=10 [--seed=0]

Runs a tiny configuration of the full pipeline (real MovieLens-100K; a tiny random Llama with
SmolLM2's tokenizer and a tiny random SBERT with MiniLM's, written by allmrec_jax.testing;
CF, stage 1 with SBERT fine-tuned, stage 2, validation rankings, the test evaluation with
generation and diagnostics) through `launch/train.py`:

1. once uninterrupted (OUT/ref), which also fixes the run's "progress" scale: the number of
   rows of every stage's metrics.jsonl plus the evaluation results stored under stage2/eval;
2. then, in OUT/killed, --kills times: (re)start the same command, wait until its progress
   reaches the next of --kills sorted random targets on that scale, wait a random 0 to
   --jitter_s seconds more (so kills land inside steps, saves, restores and evaluations),
   SIGKILL the process group; finally run it to the end.

The two runs must agree: every stage's metrics.json and every metrics.jsonl row, timing
fields aside (names ending in time_s, seconds, per_s, tok_s), and no metrics.jsonl has a
step twice. Prints one JSON summary (also OUT/summary.json); exit status 1 on a mismatch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

from allmrec_jax import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "folder for the assets and the two run folders", required=True)
flags.DEFINE_integer("kills", 10, "how many SIGKILLs")
flags.DEFINE_integer("seed", 0, "seed of the kill points")
flags.DEFINE_float("jitter_s", 2.0, "random extra delay after a progress target is reached")
flags.DEFINE_integer("timeout_s", 900, "limit for one (re)start of the pipeline")
flags.DEFINE_list("signal", ["KILL"], "the signals of the kills, in turn (KILL,TERM "
                  "alternates): KILL = SIGKILL the process group (nothing saved); TERM = "
                  "SIGTERM the process, as a scheduler preempting it (the loop saves a "
                  "checkpoint at the step reached and exits with loop.EXIT_PREEMPTED)")
SIGNALS = ("KILL", "TERM")

# Tiny sizes; checkpoints at every step / epoch so that kills land between and inside saves.
OVERRIDES = {
    "cf.hidden_dim": 12, "cf.num_blocks": 1, "cf.num_epochs": 4, "cf.eval_every": 2,
    "cf.ckpt_every": 1, "cf.progress": False, "cf.grad_splits": 1,
    "sbert.max_len": 24,
    "stage1.max_steps": 6, "stage1.checkpoint_every": 1, "stage1.latent_dim": 8,
    "stage1.batch_size": 8, "stage1.freeze_sbert": False,
    "stage2.max_steps": 6, "stage2.ckpt_every": 1, "stage2.log_every": 1,
    "stage2.eval_every": 3, "stage2.eval_users": 4, "stage2.batch_size": 2,
    "stage2.len_bucket": 1024,
    "eval.max_users": 4, "eval.batch_size": 4, "eval.max_new_tokens": 4,
    "eval.baselines": "cf", "eval.diagnostics": "user_shuffled",
}
STAGES = ("cf", "stage1", "stage2")
_TIMING_SUFFIXES = ("time_s", "seconds", "per_s", "tok_s")


def is_timing(key: str) -> bool:
  return key.endswith(_TIMING_SUFFIXES)


def command(assets: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  overrides = {**OVERRIDES, "llm.path": assets / "llm", "sbert.path": assets / "sbert"}
  return ([sys.executable, str(ROOT / "launch" / "train.py"), "--config=configs/ml100k.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()])


def environment() -> dict[str, str]:
  return testing.one_device_env()   # one device: both runs compile the same programs


def progress(workdir: pathlib.Path) -> int:
  """Rows of the stages' metrics.jsonl + stored evaluation results (grows monotonically
  along an uninterrupted run)."""
  n = 0
  for stage in STAGES:
    f = workdir / stage / "metrics.jsonl"
    if f.exists():
      with contextlib.suppress(OSError):    # being rewritten: counted on the next poll
        n += sum(1 for line in f.read_text().splitlines() if line.strip())
  ev = workdir / "stage2" / "eval"
  if ev.is_dir():
    n += sum(1 for _ in ev.glob("*.json"))
  return n


def run_once(cmd, env, workdir: pathlib.Path, log: pathlib.Path, timeout_s: int,
             kill_at: int | None = None, jitter_s: float = 0.0, sig: str = "KILL") -> dict:
  """Starts the pipeline; with kill_at, sends `sig` (KILL: SIGKILL to the process group;
  TERM: SIGTERM to the process, then waits for it to exit) jitter_s after progress >=
  kill_at. Returns {"killed", "signal", "rc", "progress_at_kill", "seconds"}."""
  t0 = time.monotonic()
  with open(log, "ab") as f:
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
      if kill_at is not None:
        while p.poll() is None and progress(workdir) < kill_at:
          if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no progress to {kill_at} within {timeout_s} s; see {log}")
          time.sleep(0.05)
        deadline = time.monotonic() + jitter_s
        while p.poll() is None and time.monotonic() < deadline:
          time.sleep(0.02)
        if p.poll() is None:
          at = progress(workdir)
          if sig == "TERM":
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout=timeout_s)
            f.flush()
            tail = log.read_bytes()[-4000:].decode("utf-8", "replace")
            return {"killed": True, "signal": sig, "rc": p.returncode,
                    "progress_at_kill": at, "preempted_line": "preempted at" in tail,
                    "seconds": round(time.monotonic() - t0, 1)}
          os.killpg(p.pid, signal.SIGKILL)
          p.wait()
          return {"killed": True, "signal": sig, "rc": p.returncode, "progress_at_kill": at,
                  "seconds": round(time.monotonic() - t0, 1)}
      p.wait(timeout=timeout_s)
    finally:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  if p.returncode != 0:
    raise RuntimeError(f"pipeline exited with {p.returncode}; see {log}")
  return {"killed": False, "rc": 0, "seconds": round(time.monotonic() - t0, 1)}


def _rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _diff(a, b, where: str, out: list[str]):
  """Appends to `out` where a and b differ (timing fields aside; floats exactly)."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if is_timing(str(k)):
        continue
      if k not in a or k not in b:
        out.append(f"{where}.{k}: only in {'killed' if k in b else 'ref'}")
      else:
        _diff(a[k], b[k], f"{where}.{k}", out)
  elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    for i, (x, y) in enumerate(zip(a, b)):
      _diff(x, y, f"{where}[{i}]", out)
  elif a != b and not (isinstance(a, float) and isinstance(b, float)
                       and math.isnan(a) and math.isnan(b)):
    out.append(f"{where}: {a!r} != {b!r}")


def compare(ref: pathlib.Path, killed: pathlib.Path) -> dict:
  diffs: list[str] = []
  duplicates: list[str] = []
  for stage in STAGES:
    _diff(json.loads((ref / stage / "metrics.json").read_text()),
          json.loads((killed / stage / "metrics.json").read_text()), f"{stage}/metrics.json",
          diffs)
    a, b = _rows(ref / stage / "metrics.jsonl"), _rows(killed / stage / "metrics.jsonl")
    key = "epoch" if stage == "cf" else "step"
    steps = [r[key] for r in b]
    # Stage 2 writes a training row and a validation row per evaluated step.
    kinds = [(r[key], tuple(sorted(k for k in r if not is_timing(k)))) for r in b]
    if len(set(kinds)) != len(kinds):
      duplicates.append(f"{stage}/metrics.jsonl: {len(kinds) - len(set(kinds))} repeated rows "
                        f"(steps {steps})")
    if len(a) != len(b):
      diffs.append(f"{stage}/metrics.jsonl: {len(a)} rows in ref, {len(b)} in killed")
    else:
      _diff(a, b, f"{stage}/metrics.jsonl", diffs)
  return {"identical": not diffs and not duplicates, "differences": diffs[:50],
          "num_differences": len(diffs), "duplicates": duplicates}


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  assets = out / "assets"
  if not (assets / "llm" / "config.json").exists():
    testing.write_tiny_llama(assets / "llm")
    testing.write_tiny_sbert(assets / "sbert")
  bad = [x for x in FLAGS.signal if x not in SIGNALS]
  if bad or not FLAGS.signal:
    raise app.UsageError(f"--signal={','.join(FLAGS.signal)}: choose from {', '.join(SIGNALS)}")
  env = environment()
  ref, killed = out / "ref", out / "killed"
  if not (ref / "stage2" / "metrics.json").exists():
    r = run_once(command(assets, ref), env, ref, out / "ref.log", FLAGS.timeout_s)
    ref_seconds = r["seconds"]
  else:
    ref_seconds = None
  total = progress(ref)
  rng = np.random.default_rng(FLAGS.seed)
  # Targets below the last progress point leave work to interrupt after the jitter.
  targets = sorted(int(t) for t in rng.integers(0, max(total - 1, 1), FLAGS.kills))
  kills = []
  for i, target in enumerate(targets):
    r = run_once(command(assets, killed), env, killed, out / "killed.log", FLAGS.timeout_s,
                 kill_at=target, jitter_s=float(rng.uniform(0.0, FLAGS.jitter_s)),
                 sig=FLAGS.signal[i % len(FLAGS.signal)])
    kills.append({"target": target, **r})
    print(json.dumps({"kill": len(kills), **kills[-1]}), flush=True)
    if not r["killed"]:
      break            # it finished before the kill: nothing left to interrupt
  final = run_once(command(assets, killed), env, killed, out / "killed.log", FLAGS.timeout_s)
  summary = {"kills_requested": FLAGS.kills,
             "kills_done": sum(k["killed"] for k in kills), "progress_total": total,
             "ref_seconds": ref_seconds, "final_seconds": final["seconds"], "kills": kills,
             **compare(ref, killed)}
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  print(json.dumps({k: v for k, v in summary.items() if k != "kills"}), flush=True)
  if not summary["identical"] or summary["kills_done"] < FLAGS.kills:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
