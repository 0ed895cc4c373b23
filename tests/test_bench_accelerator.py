"""benchmarks/bench_accelerator.py --model=tiny on the CPU: one JSON line per measurement,
each with its step time, tokens/s, MFU and peak memory."""

import json
import pathlib
import subprocess
import sys

from allmrec_jax import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_prints_measurements():
  r = subprocess.run(
      [sys.executable, "benchmarks/bench_accelerator.py", "--model=tiny", "--batches=2,4",
       "--eval_batch=2", "--new_tokens=3", "--warmup=1", "--iters=2", "--eval_iters=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=testing.one_device_env())
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
  by = {}
  for rec in lines:
    by.setdefault(rec["measure"], []).append(rec)
  assert by["device"][0]["bf16_matmul_peak_tflop_s"] > 0
  assert by["init"][0]["params"] > 0
  train, ev = by["train_step"], by["evaluation"]
  assert [t["batch"] for t in train] == [2, 4]
  for rec in train + ev:
    assert rec["side"] == "jax" and rec["dtype"] == "bfloat16", rec
    assert rec["step_s"] > 0 and rec["tokens_per_s"] > 0, rec
    assert 0 < rec["mfu"] < 1.5, rec        # against the peak measured in the same run
    assert rec["peak_memory_bytes"] > 0 and rec["peak_memory_source"] in ("device", "host_rss")
  # The paper's prompt: 10 history + 20 candidate titles, each with its soft token.
  assert all(300 <= t["nonpad_tokens"] / t["batch"] <= 700 for t in train), train
  assert ev[0]["candidates"] == 20 and ev[0]["users_per_s"] > 0


def test_bad_flag_is_one_line():
  r = subprocess.run([sys.executable, "benchmarks/bench_accelerator.py", "--model=opt-9b"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=testing.one_device_env())
  assert r.returncode == 2 and "--model='opt-9b'" in r.stderr and "Traceback" not in r.stderr
