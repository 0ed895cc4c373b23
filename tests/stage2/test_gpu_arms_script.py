"""Smoke test of the study script experiments/gpu_stage2_arms.py on a CPU with tiny
settings: real MovieLens-100K, a tiny random Llama (the real SmolLM2 tokenizer), a tiny
random SBERT; the script trains cf/ and stage1/ of an empty run folder itself, then runs
its three arms and writes one JSON line per arm."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from allmrec_jax import testing

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARMS = ["oracle", "method_bos_first", "method_user_first"]

# Tiny cf/stage1 (one epoch / one step) and one prompt-length bucket (one compile).
OVERRIDES = {"cf.hidden_dim": 12, "cf.num_blocks": 1, "cf.num_epochs": 1, "cf.eval_every": 1,
             "cf.progress": False, "cf.grad_splits": 1, "sbert.max_len": 24,
             "stage1.max_steps": 1, "stage1.freeze_sbert": True, "stage1.latent_dim": 8,
             "stage1.batch_size": 8, "stage2.len_bucket": 1024, "eval.batch_size": 4}


def test_arms_smoke(tmp_path):
  testing.write_tiny_llama(tmp_path / "llm")
  testing.write_tiny_sbert(tmp_path / "sbert")
  workdir, out = tmp_path / "run", tmp_path / "arms.jsonl"
  overrides = {**OVERRIDES, "llm.path": tmp_path / "llm", "sbert.path": tmp_path / "sbert"}
  cmd = [sys.executable, "-m", "experiments.gpu_stage2_arms",
         "--config=configs/ml100k_paper.py", f"--workdir={workdir}", f"--out={out}",
         "--arms=" + ",".join(ARMS), "--steps=2", "--batch_size=2", "--eval_every=2",
         "--eval_users=4", "--time_budget_s=100000"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  p = subprocess.run(cmd, capture_output=True, text=True, env=testing.one_device_env(),
                     cwd=ROOT, timeout=600, check=False)
  assert p.returncode == 0, p.stderr[-4000:]
  assert (workdir / "cf" / "FINISHED").is_file()
  assert (workdir / "stage1" / "FINISHED").is_file()
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["arm"] for r in lines] == ARMS
  for r in lines:
    assert r["steps_done"] == 2
    for when in ("before", "after"):
      assert 0.0 <= r[when]["hit@1"] <= r[when]["hit@5"] <= 1.0, (r["arm"], when)
