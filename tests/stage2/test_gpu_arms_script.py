"""scripts/gpu_stage2_arms.py on a CPU with tiny settings: real MovieLens-100K, a tiny random
Llama (the real SmolLM2 tokenizer), a tiny random SBERT; the script trains cf/ and stage1/
of an empty run folder itself, then runs its three arms."""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from allmrec_jax import testing
from allmrec_jax.data import prepare
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import stage1 as stage1_lib
from configs import ml100k

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_stage2_arms.py"
ARMS = ["oracle", "method_bos_first", "method_user_first"]
EVAL_USERS = 4

# Tiny cf/stage1 (one epoch / one step) and one prompt-length bucket (one compile).
OVERRIDES = {"cf.hidden_dim": 12, "cf.num_blocks": 1, "cf.num_epochs": 1, "cf.eval_every": 1,
             "cf.progress": False, "cf.grad_splits": 1, "sbert.max_len": 24,
             "stage1.max_steps": 1, "stage1.freeze_sbert": True, "stage1.latent_dim": 8,
             "stage1.batch_size": 8, "stage2.len_bucket": 1024, "eval.batch_size": 4}


def _digest(a: np.ndarray) -> str:
  """The script's `user_rep_digest` / `eval_users_digest` of an array."""
  a = np.ascontiguousarray(a)
  return hashlib.sha1(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()
                      ).hexdigest()[:12]


def _run(assets_dir: pathlib.Path, workdir: pathlib.Path, out: pathlib.Path, *flags_):
  overrides = {**OVERRIDES, "llm.path": assets_dir / "llm", "sbert.path": assets_dir / "sbert"}
  env = testing.one_device_env()   # one CPU device, as on the single GPU
  cmd = [sys.executable, str(SCRIPT), "--config=configs/ml100k.py", f"--workdir={workdir}",
         f"--out={out}", *flags_] + [f"--config.{k}={v}" for k, v in overrides.items()]
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
                     check=False)
  assert p.returncode == 0, p.stderr[-4000:]
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  printed = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
  assert printed == lines
  return lines


@pytest.fixture(scope="module")
def arms_run(tmp_path_factory):
  base = tmp_path_factory.mktemp("gpu_arms")
  testing.write_tiny_llama(base / "llm")
  testing.write_tiny_sbert(base / "sbert")
  workdir = base / "run"       # empty: the script trains cf/ and stage1/ first
  lines = _run(base, workdir, base / "arms.jsonl", "--arms=" + ",".join(ARMS), "--steps=3",
               "--batch_size=2", "--eval_every=2", f"--eval_users={EVAL_USERS}",
               "--time_budget_s=100000")
  return base, workdir, lines


def test_one_line_per_arm_with_metrics(arms_run):
  _, workdir, lines = arms_run
  assert (workdir / "cf" / "FINISHED").is_file()
  assert (workdir / "stage1" / "FINISHED").is_file()
  assert [r["arm"] for r in lines] == ARMS
  bos = {"oracle": "first", "method_bos_first": "first", "method_user_first": "after_user"}
  for r in lines:
    assert r["steps_done"] == r["steps_requested"] == 3 and not r["stopped_by_budget"]
    assert r["batch_size"] == 2 and r["bos"] == bos[r["arm"]]
    assert r["item_slot"] == "after_title" and r["user_at_answer"] is False
    assert r["train_candidates"] == 20 and r["train_history"] == 10
    assert r["lr"] == ml100k.get_config().stage2.lr
    assert r["eval_users"] == EVAL_USERS and r["device_kind"] == jax.devices()[0].device_kind
    for when in ("before", "after"):
      m = r[when]
      assert 0.0 <= m["hit@1"] <= m["hit@5"] <= 1.0, (r["arm"], when)
      assert 0.0 < m["mrr"] <= 1.0
    assert [s for s, _ in r["curve"]] == [0, 2, 3]
    assert all(0.0 <= h <= 1.0 for _, h in r["curve"])
    assert r["curve"][0][1] == r["before"]["hit@1"] and r["curve"][-1][1] == r["after"]["hit@1"]
    assert 0.0 < r["loss_first20"] < 100 and 0.0 < r["loss_last20"] < 100
    assert r["seconds"] > 0
  # Every arm is ranked on the same validation users.
  assert len({r["eval_users_digest"] for r in lines}) == 1


def test_oracle_user_token_is_the_targets_cf_embedding(arms_run):
  base, workdir, lines = arms_run
  by_arm = {r["arm"]: r for r in lines}
  c = ml100k.get_config()
  for k, v in {**OVERRIDES, "sbert.path": str(base / "sbert")}.items():
    section, field = k.split(".")
    c[section][field] = v
  ds = prepare.prepare_dataset(c.data)
  es = eval_lib.make_eval_set(ds, "valid", maxlen=c.data.maxlen,
                              num_history=c.eval.num_history, max_users=EVAL_USERS,
                              seed=c.data.candidate_seed)
  assert by_arm["oracle"]["eval_users_digest"] == _digest(es.users)
  cf_model, cf_params = cf_lib.load_trained_cf(c, workdir, ds)
  cf_table = np.asarray(stage1_lib.cf_item_table(cf_model, {"params": cf_params}), np.float32)
  assert by_arm["oracle"]["user_rep_digest"] == _digest(cf_table[es.targets])
  # The two method arms share x_u (the CF user representation), which is not the oracle's.
  assert by_arm["method_bos_first"]["user_rep_digest"] == \
      by_arm["method_user_first"]["user_rep_digest"]
  assert by_arm["method_bos_first"]["user_rep_digest"] != by_arm["oracle"]["user_rep_digest"]



def test_exported_tables_replace_stage1_and_test_pass(arms_run, tmp_path):
  """--export_tables then --tables: a run folder with only cf/ gives the same arm as the
  full one (same tables, same batches), and --test_users adds the test pass."""
  import shutil  # pylint: disable=g-import-not-at-top
  base, workdir, lines = arms_run
  tables = tmp_path / "tables.npz"
  overrides = [f"--config.{k}={v}" for k, v in
               {**OVERRIDES, "llm.path": base / "llm", "sbert.path": base / "sbert"}.items()]
  env = testing.one_device_env()
  p = subprocess.run([sys.executable, str(SCRIPT), "--config=configs/ml100k.py",
                      f"--workdir={workdir}", "--out=unused", f"--export_tables={tables}",
                      *overrides], capture_output=True, text=True, env=env, cwd=ROOT,
                     timeout=600, check=False)
  assert p.returncode == 0, p.stderr[-4000:]
  with np.load(tables) as f:
    assert sorted(f) == ["cf", "joint"]
  slim = tmp_path / "slim"
  shutil.copytree(workdir / "cf", slim / "cf")     # no stage1/: the tables stand in for it
  rows = _run(base, slim, tmp_path / "arms.jsonl", "--arms=method_bos_first", "--steps=3",
              "--batch_size=2", "--eval_every=2", f"--eval_users={EVAL_USERS}",
              "--time_budget_s=100000", f"--tables={tables}", "--test_users=5",
              "--test_generate", "--eval_batch_size=2")
  assert not (slim / "stage1").exists()
  (row,) = rows
  full = {r["arm"]: r for r in lines}["method_bos_first"]
  assert row["curve"] == full["curve"] and row["after"] == full["after"]
  assert row["loss_last20"] == full["loss_last20"]
  t = row["test"]
  assert t["users"] == 5 and t["split"] == "test"
  for k in ("hit@1", "mrr", "gen_hit@1", "hit@1_user_shuffled", "mrr_user_shuffled"):
    assert 0.0 <= t[k] <= 1.0, k
  assert t["target_loss"] == t["loss"] > 0.0
