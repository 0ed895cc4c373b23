"""Smoke tests of the study scripts that train stage 2 through the product's training loop,
on a CPU with tiny settings: real MovieLens-100K, a tiny random Llama (the real SmolLM2
tokenizer), a tiny random SBERT.

experiments/gpu_stage2_arms.py trains cf/ and stage1/ of an empty run folder itself, then
runs its three arms (the loop paused and resumed for the budget checks) and writes one JSON
line per arm; a spent budget stops an arm at its first check. experiments/probe_stage2.py
and experiments/probe_match.py then train on that run folder."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from allmrec_jax import testing
from allmrec_jax.data import prompts as prompts_lib
from allmrec_jax.trainers import evaluate as eval_lib
from experiments import probe_stage2

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARMS = ["oracle", "method_bos_first", "method_user_first"]

# Tiny cf/stage1 (one epoch / one step) and one prompt-length bucket (one compile).
OVERRIDES = {"cf.hidden_dim": 12, "cf.num_blocks": 1, "cf.num_epochs": 1, "cf.eval_every": 1,
             "cf.progress": False, "cf.grad_splits": 1, "sbert.max_len": 24,
             "stage1.max_steps": 1, "stage1.freeze_sbert": True, "stage1.latent_dim": 8,
             "stage1.batch_size": 8, "stage2.len_bucket": 1024, "eval.batch_size": 4}


def _run(module: str, *flags) -> list[dict]:
  """Runs `python -m experiments.<module> flags` on one CPU device; its JSON stdout lines."""
  p = subprocess.run([sys.executable, "-m", f"experiments.{module}", *map(str, flags)],
                     capture_output=True, text=True, env=testing.one_device_env(), cwd=ROOT,
                     timeout=600, check=False)
  assert p.returncode == 0, p.stderr[-4000:]
  return [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
  """(the common flags: config, workdir, tiny models; the arms' JSON lines): the arms
  script run on an empty folder, which trains its cf/ and stage1/ first."""
  tmp = tmp_path_factory.mktemp("arms")
  testing.write_tiny_llama(tmp / "llm")
  testing.write_tiny_sbert(tmp / "sbert")
  overrides = {**OVERRIDES, "llm.path": tmp / "llm", "sbert.path": tmp / "sbert"}
  common = ["--config=configs/ml100k_paper.py", f"--workdir={tmp / 'run'}"]
  common += [f"--config.{k}={v}" for k, v in overrides.items()]
  out = tmp / "arms.jsonl"
  _run("gpu_stage2_arms", *common, f"--out={out}", "--batch_size=2", "--eval_users=4",
       "--arms=" + ",".join(ARMS), "--steps=3", "--eval_every=2", "--check_every=2",
       "--time_budget_s=100000")
  assert (tmp / "run" / "cf" / "FINISHED").is_file()
  assert (tmp / "run" / "stage1" / "FINISHED").is_file()
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  return common, tmp, lines


def test_arms_smoke(run_folder):
  _, _, lines = run_folder
  assert [r["arm"] for r in lines] == ARMS
  for r in lines:
    assert r["steps_done"] == 3 and not r["stopped_by_budget"]
    assert [s for s, _ in r["curve"]] == [0, 2, 3]           # before, every 2 steps, end
    assert r["curve"][-1][1] == r["after"]["hit@1"]
    for when in ("before", "after"):
      assert 0.0 <= r[when]["hit@1"] <= r[when]["hit@5"] <= 1.0, (r["arm"], when)


def test_arms_budget_stop(run_folder):
  """A budget spent before training: the arm stops at its first check, ranked there. The
  method arm trains with the small-LLM options (match term, LoRA, history drop, warmup +
  cosine) and its test pass scores the test users with both shuffles and the baselines."""
  common, tmp, _ = run_folder
  out = tmp / "spent.jsonl"
  options = {"user_match_weight": 1.0, "user_match_negatives": "catalog",
             "user_match_batch": 4, "train_lora": True, "history_drop": 0.5,
             "schedule": "warmup_cosine"}
  (r,) = _run("gpu_stage2_arms", *common, f"--out={out}", "--batch_size=2",
              "--eval_users=4", "--arms=method_bos_first", "--steps=5", "--eval_every=0",
              "--check_every=1", "--time_budget_s=1", "--test_users=3",
              *[f"--config.stage2.{k}={v}" for k, v in options.items()])
  assert r["steps_done"] == 1 and r["stopped_by_budget"]
  assert [s for s, _ in r["curve"]] == [0, 1]
  assert (r["user_match_batch"], r["train_lora"], r["history_drop"], r["schedule"]) == (
      4, True, 0.5, "warmup_cosine")
  t = r["test"]
  assert t["users"] == 3 and "gen_hit@1" not in t
  for k in ("hit@1", "hit@1_user_shuffled", "hit@1_context_shuffled", "cf_hit@1",
            "popularity_hit@1"):
    assert 0.0 <= t[k] <= 1.0, k


def test_probe_stage2_smoke(run_folder):
  common, _, _ = run_folder
  lines = _run("probe_stage2", *common, "--user=oracle", "--items=marker", "--steps=2",
               "--eval_every=1", "--eval_users=4", "--config.stage2.batch_size=2")
  before, mid, out = lines
  assert set(before) == {"before"} and mid["step"] == 1
  assert out["before"] == before["before"] and out["steps"] == 2
  for m in (out["before"], mid["rank"], out["after"]):
    assert 0.0 <= m["hit@1"] <= m["hit@5"] <= 1.0
  assert np.isfinite(out["loss_first20"]) and np.isfinite(out["loss_last20"])


def test_probe_match_smoke(run_folder):
  common, _, _ = run_folder
  header, *rows = _run("probe_match", *common, "--negatives=prompt", "--batch=8",
                       "--steps=3", "--eval_every=2", "--eval_users=20")
  assert header["negatives"] == "prompt"
  assert [r["step"] for r in rows] == [0, 2, 3]
  assert rows[0]["loss"] is None and all(np.isfinite(r["loss"]) for r in rows[1:])


class _Builder:
  """A PromptBuilder stand-in: item slots = the history, then the candidates."""

  def build(self, history, candidates, targets=None, **kw):
    del targets, kw
    ids = np.concatenate([history, candidates], 1).astype(np.int32)
    z = np.zeros_like(ids)
    return prompts_lib.PromptBatch(ids, z, z[:, :1], z, ids, z, z, z.astype(np.float32),
                                   z[:, 0])

  def continuations(self, candidates, soft=True):
    return ("continuations", soft)


def test_marked_prompts():
  """probe_stage2 --items=marker: the target's slot points at the marker row, in training
  prompts (targets given) and evaluation prompts (targets found by the candidate row)."""
  es = eval_lib.eval_set(np.array([1, 2]), np.zeros((2, 3)), np.array([[5, 6], [7, 8]]),
                         np.array([[10, 11, 12, 13], [20, 21, 22, 23]]), seed=0)
  marked = probe_stage2.MarkedPrompts(_Builder(), 99, es)
  got = marked.build(es.history, es.prompt_candidates, None, padding="left").item_ids
  want = np.concatenate([es.history, es.prompt_candidates], 1)
  want[want == 10] = 99
  want[want == 20] = 99
  np.testing.assert_array_equal(got, want)
  train = marked.build(es.history, es.prompt_candidates, np.array([12, 23])).item_ids
  assert (train == 99).sum() == 2 and train[0, 2 + list(es.prompt_candidates[0]).index(12)] == 99
  assert marked.continuations(es.prompt_candidates, soft=False) == ("continuations", False)
