"""A tiny end-to-end run through every stage (real MovieLens-100K and MiniLM, a tiny random
Llama saved as a Hugging Face directory), then a rerun that skips the finished stages."""

import json

import numpy as np
import pytest

from allmrec_jax import testing
from allmrec_jax.trainers import runner
from configs import ml100k

LLAMA = dict(hidden=32, inter=64, layers=2, heads=4, kv_heads=2)   # a tiny random Llama


@pytest.mark.slow
def test_all_stages_tiny(tmp_path):
  c = ml100k.get_config()
  c.llm.path = str(testing.write_tiny_llama(tmp_path / "llm", **LLAMA))
  c.cf.num_epochs, c.cf.eval_every = 2, 1
  c.stage1.max_steps = 2
  c.stage2.max_steps, c.stage2.ckpt_every = 3, 2
  c.eval.max_users, c.eval.max_new_tokens, c.eval.batch_size = 4, 4, 4
  c.eval.baselines = "cf,llm_only,mlp_llm"   # all three (configs/ml100k.py makes MLP-LLM opt-in)
  work = tmp_path / "run"
  metrics = runner.train_and_evaluate(c, work)
  for stage in ("cf", "stage1", "stage2", "stage2_mlp_llm"):
    assert (work / stage).is_dir(), stage
  saved = json.loads((work / "stage2" / "metrics.json").read_text())
  assert saved == metrics
  assert saved["eval/num_users"] == 4
  for prefix in ("test/", "baselines/cf/test/", "baselines/llm_only/test/",
                 "baselines/mlp_llm/test/"):
    assert 0.0 <= saved[prefix + "hit@1"] <= saved[prefix + "hit@5"] <= 1.0, prefix
    assert saved[prefix + "mrr"] > 0
  assert "test/gen_hit@1" in saved and "baselines/llm_only/test/gen_hit@1" in saved
  lines = [json.loads(l) for l in (work / "stage2" / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["step"] == 3 and np.isfinite(lines[-1]["train/loss"])
  results = (work / "results.md").read_text()
  assert "| A-LLMRec |" in results and "[CandidateEmb]" in results
  # A rerun restores every finished stage instead of training again.
  again = runner.train_and_evaluate(c, work)
  assert again == metrics


@pytest.mark.slow
def test_long_config_layout_tiny(tmp_path):
  """configs/ml100k_long.py's stage 2 (in-quotes item slots, [U] at the answer, short
  training prompts, several positions per user) end to end with validation rankings,
  the learning curve and the soft-token diagnostics."""
  from configs import ml100k_long  # pylint: disable=import-outside-toplevel
  c = ml100k_long.get_config()
  c.llm.path = str(testing.write_tiny_llama(tmp_path / "llm", **LLAMA))
  c.cf.num_epochs, c.cf.eval_every = 2, 1
  c.stage1.max_steps = 2
  c.stage2.max_steps, c.stage2.ckpt_every, c.stage2.eval_every = 4, 2, 2
  c.stage2.eval_users = 4
  c.eval.max_users, c.eval.max_new_tokens, c.eval.batch_size = 4, 4, 4
  c.eval.baselines = "cf"
  work = tmp_path / "run"
  metrics = runner.train_and_evaluate(c, work)
  rows = [json.loads(l) for l in (work / "stage2" / "metrics.jsonl").read_text().splitlines()]
  val = [r for r in rows if "val/hit@1" in r]
  assert [r["step"] for r in val] == [0, 2, 4]
  assert all(0.0 <= r["val/hit@1"] <= 1.0 and np.isfinite(r["val/loss"]) for r in val)
  assert (work / "stage2" / "learning_curve.png").stat().st_size > 1000
  for suffix in ("", "_user_shuffled", "_items_permuted"):
    assert 0.0 <= metrics[f"diag/test/hit@1{suffix}"] <= 1.0
    assert np.isfinite(metrics[f"diag/test/loss{suffix}"])
  assert metrics["diag/test/hit@1"] == metrics["test/hit@1"]
  results = (work / "results.md").read_text()
  assert "x_u shuffled across users" in results
  assert '"[CandidateEmb]' in results and '"[UserRep]' in results


def test_impossible_config_values_are_refused_before_any_stage(tmp_path):
  c = ml100k.get_config()
  c.cf.lr = -1.0
  c.stage2.batch_size = 0
  c.stage2.max_steps = -3
  c.llm.path = str(tmp_path / "no_such_llm")
  c.eval.baselines = "cf,tallrec"
  c.stage2.user_match_weight, c.stage2.user_match_batch = 1.0, 8   # prompt negatives
  work = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    runner.train_and_evaluate(c, work)
  msg = str(e.value)
  assert msg.startswith("invalid config: ") and "\n" not in msg
  for part in ("--config.cf.lr=-1.0 must be > 0", "--config.stage2.batch_size=0 must be > 0",
               "--config.stage2.max_steps=-3 must be >= 0",
               f"--config.llm.path='{tmp_path / 'no_such_llm'}' does not exist",
               "--config.eval.baselines: unknown baseline(s) ['tallrec']; known: ['cf', "
               "'llm_only', 'mlp_llm', 'popularity']",
               "--config.stage2.user_match_batch > 0 needs "
               "--config.stage2.user_match_negatives=catalog"):
    assert part in msg, part
  assert not work.exists()          # nothing was trained, no config.json written
  runner.validate_config(ml100k.get_config())   # the shipped configs pass
  from configs import ml100k_long  # pylint: disable=g-import-not-at-top
  runner.validate_config(ml100k_long.get_config())


def test_finished_stage_under_another_config_is_refused(tmp_path):
  """config.json never lies: a field that produced a finished stage cannot change (one-line
  error naming it), a field of an unfinished stage can, and the change is logged."""
  work = tmp_path / "run"
  c = ml100k.get_config()
  runner.save_config(c, work)
  (work / "cf").mkdir()
  (work / "cf" / "FINISHED").write_text("{}\n")
  longer = ml100k.get_config()
  longer.stage2.max_steps = 900            # stage 2 not finished: allowed, and recorded
  longer.mesh.shape = (1, 1, 1)            # neutral
  runner.save_config(longer, work)
  hist = [json.loads(l) for l in (work / "config_history.jsonl").read_text().splitlines()]
  assert hist == [{"changed": {"stage2.max_steps": [0, 900]}}]
  assert json.loads((work / "config.json").read_text())["stage2"]["max_steps"] == 900
  other = ml100k.get_config()
  other.stage2.max_steps = 900
  other.cf.lr = 0.01
  with pytest.raises(ValueError, match=r"finished stage\(s\) cf were produced with another "
                     r"config \(cf\.lr: 0\.001 -> 0\.01\); use a new --workdir"):
    runner.save_config(other, work)
  assert json.loads((work / "config.json").read_text())["cf"]["lr"] == 0.001
  (work / "stage1").mkdir()
  (work / "stage1" / "finished.json").write_text("{}")
  s1 = ml100k.get_config()
  s1.stage2.max_steps = 900
  s1.stage1.lr = 1.0
  with pytest.raises(ValueError, match=r"cf, stage1 .*stage1\.lr"):
    runner.train_and_evaluate(s1, work)
  # A field the code no longer has (or a new one) is recorded, never a refusal: the run
  # folder of an older version stays usable.
  saved = json.loads((work / "config.json").read_text())
  saved["cf"]["retired_option"] = 3
  (work / "config.json").write_text(json.dumps(saved))
  runner.save_config(longer, work)
  hist = [json.loads(l) for l in (work / "config_history.jsonl").read_text().splitlines()]
  assert hist[-1] == {"changed": {"cf.retired_option": [3, None]}}
