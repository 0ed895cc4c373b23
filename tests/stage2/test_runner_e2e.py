"""A tiny end-to-end run through every stage (real MovieLens-100K, a tiny random Llama and
SBERT saved as Hugging Face directories with the real tokenizers), then a rerun that skips
the finished stages; the long config's stage 2 end to end.

The real MiniLM runs in stage 1 on MovieLens-100K in tests/stage1 (its numbers against
sentence-transformers in tests/text); here it would only add its cost."""

import json
import subprocess
import sys

import numpy as np
import pytest

from allmrec_jax import run_config
from allmrec_jax import testing
from allmrec_jax.trainers import runner
from configs import ml100k

LLAMA = dict(hidden=32, inter=64, layers=2, heads=4, kv_heads=2)   # a tiny random Llama


@pytest.mark.slow
def test_all_stages_tiny(tmp_path):
  c = ml100k.get_config()
  c.llm.path = str(testing.write_tiny_llama(tmp_path / "llm", **LLAMA))
  c.sbert.path = str(testing.write_tiny_sbert(tmp_path / "sbert"))
  c.sbert.max_len = 32
  c.cf.num_epochs, c.cf.eval_every = 2, 1
  c.cf.grad_splits = 1       # the same objective (tests/cf), a third of the CF compile time
  c.stage1.max_steps = 2
  c.stage2.max_steps, c.stage2.ckpt_every = 3, 2
  c.stage2.len_bucket = 512  # one prompt length: each training and evaluation one program
  c.eval.max_users, c.eval.max_new_tokens, c.eval.batch_size = 4, 4, 4
  c.eval.baselines = "cf,llm_only,mlp_llm,tallrec"   # the trained ones are opt-in elsewhere
  c.mesh.shape = (2, 1, 1)   # data parallel over 2 of the 8 devices: sharded, fewer copies
  work = tmp_path / "run"
  metrics = runner.train_and_evaluate(c, work)
  for stage in ("cf", "stage1", "stage2", "stage2_mlp_llm", "stage2_tallrec"):
    assert (work / stage).is_dir(), stage
  saved = json.loads((work / "stage2" / "metrics.json").read_text())
  assert saved == metrics
  assert saved["eval/num_users"] == 4
  for prefix in ("test/", "baselines/cf/test/", "baselines/llm_only/test/",
                 "baselines/mlp_llm/test/", "baselines/tallrec/test/"):
    hit1, hit5, mrr = (saved[prefix + k] for k in ("hit@1", "hit@5", "mrr"))
    assert hit1 * 4 == round(hit1 * 4) and hit5 * 4 == round(hit5 * 4), prefix  # 4 users
    assert hit1 <= hit5 and hit1 <= mrr <= (1 + hit1) / 2 + 1e-9, prefix  # rr 1 or <= 1/2
    assert mrr >= 1 / 20, prefix                                      # 20 candidates
  for prefix in ("test/", "baselines/llm_only/test/", "baselines/tallrec/test/"):
    assert saved[prefix + "gen_hit@1"] * 4 == round(saved[prefix + "gen_hit@1"] * 4)
  # TALLRec trains only LoRA adapters on text-only prompts; it moved the LLM-Only ranking.
  tallrec = json.loads((work / "stage2" / "eval" / "tallrec.json").read_text())["metrics"]
  llm_only = json.loads((work / "stage2" / "eval" / "llm_only.json").read_text())["metrics"]
  assert tallrec["baselines/tallrec/test/target_loss"] != llm_only[
      "baselines/llm_only/test/target_loss"]
  lines = [json.loads(l) for l in (work / "stage2" / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["step"] == 3 and np.isfinite(lines[-1]["train/loss"])
  results = (work / "results.md").read_text()
  assert "| A-LLMRec |" in results and "[CandidateEmb]" in results
  # A rerun restores every finished stage instead of training again.
  again = runner.train_and_evaluate(c, work)
  assert again == metrics
  _check_recommend(work)


def _check_recommend(work):
  """launch/recommend.py's library path on the finished tiny run."""
  from allmrec_jax import recommend  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  config, dropped = base.run_config(work)
  assert dropped == []
  rec = recommend.Recommender(config, work)
  ans = rec.recommend(user=4, k=6, explain=True)     # user 4: no title shared by two items
  seq = rec.ds.sequence(4)
  got = [r.item for r in ans.items]
  assert len(set(got)) == 6 and not set(got) & set(seq.tolist())
  assert sorted(r.cf_rank for r in ans.items) == list(range(1, 7))
  llm = [r.llm_score for r in ans.items]
  assert llm == sorted(llm, reverse=True) and all(np.isfinite(llm))
  # CF retrieval: every other unseen item scores at most the 6th retrieved one.
  maxlen = config.data.maxlen
  padded = np.zeros((1, maxlen), np.int32)
  padded[0, -min(maxlen, len(seq)):] = seq[-maxlen:]
  allc = np.arange(1, rec.ds.num_items + 1, dtype=np.int32)[None]
  scores = np.asarray(rec.cf_model.apply(rec.cf_vars, padded, allc,
                                         method=rec.cf_model.score))[0]
  rest = np.setdiff1d(np.arange(1, rec.ds.num_items + 1), np.concatenate([seq, got]))
  assert scores[rest - 1].max() <= min(r.cf_score for r in ans.items) + 1e-6
  assert ans.history == [rec.ds.titles[i] for i in seq[-config.eval.num_history:]]
  # Another user (other history and candidate titles) runs the program compiled for the
  # first: prompts and packed answers are padded to the run's longest top-k shapes.
  rec.recommend(user=9, k=6)
  rec.recommend(history=[rec.ds.titles[int(i)] for i in rec.ds.sequence(4)[:2]], k=6)
  assert rec.evaluator._score._cache_size() == 1
  assert isinstance(ans.explanation, str)
  # The same history given as titles gives the same answer.
  by_titles = rec.recommend(history=[rec.ds.titles[i].upper() for i in seq], k=6)
  assert [(r.item, round(r.llm_score, 4)) for r in by_titles.items] == [
      (r.item, round(r.llm_score, 4)) for r in ans.items]
  with pytest.raises(ValueError, match="--user=99999: unknown user"):
    rec.recommend(user=99999)
  with pytest.raises(ValueError, match="unknown title 'No Such Film'"):
    rec.recommend(history=["Toy Story", "No Such Film"])
  with pytest.raises(ValueError, match="title 'Sabrina' names 2 items"):
    rec.recommend(history=["Toy Story", "Sabrina"])
  with pytest.raises(ValueError, match="--top_k=0"):
    rec.recommend(user=4, k=0)


@pytest.mark.slow
def test_long_config_layout_tiny(tmp_path):
  """configs/ml100k_long.py's stage 2 (in-quotes item slots, [U] at the answer, 16
  positions per user, the catalog match term, LoRA adapters, warmup + cosine decay)
  end to end with validation rankings, the learning curve and the soft-token
  diagnostics."""
  from configs import ml100k_long  # pylint: disable=import-outside-toplevel
  c = ml100k_long.get_config()
  c.llm.path = str(testing.write_tiny_llama(tmp_path / "llm", **LLAMA))
  c.sbert.path = str(testing.write_tiny_sbert(tmp_path / "sbert"))
  c.sbert.max_len = 32
  c.cf.num_epochs, c.cf.eval_every = 2, 1
  c.cf.grad_splits = 1       # the same objective (tests/cf), a third of the CF compile time
  c.stage1.max_steps = 2
  c.stage2.max_steps, c.stage2.ckpt_every, c.stage2.eval_every = 4, 2, 2
  c.stage2.batch_size = 8    # the config's layout and options, not its scale (batch 32)
  c.stage2.len_bucket = 512
  c.stage2.eval_users = 4
  c.eval.max_users, c.eval.max_new_tokens, c.eval.batch_size = 4, 4, 4
  c.eval.baselines = "cf"
  c.eval.diagnostics = "user_shuffled,items_permuted"
  c.eval.genre_users = 3
  c.mesh.shape = (1, 1, 1)   # one device (test_all_stages_tiny runs data parallel)
  work = tmp_path / "run"
  metrics = runner.train_and_evaluate(c, work)
  assert metrics["genre/num_users"] == 3
  assert {f"genre/{w}/{m}" for w in ("allmrec", "llm_only", "history")
          for m in ("precision", "recall", "named")} <= set(metrics)
  saved = json.loads((work / "stage2" / "eval" / "genre.json").read_text())
  assert all(len(v) == 3 for v in saved["answers"].values())
  assert saved["metrics"]["genre/history/named"] > 0   # the reference always names genres
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
  assert "x_u shuffled across users" in results and "## Genre question (3 users" in results
  assert '"[CandidateEmb]' in results and '"[UserRep]' in results


def test_impossible_config_values_are_refused_before_any_stage(tmp_path):
  c = ml100k.get_config()
  c.cf.lr = -1.0
  c.stage2.batch_size = 0
  c.stage2.max_steps = -3
  c.llm.path = str(tmp_path / "no_such_llm")
  c.eval.baselines = "cf,tallrec,genre_x"
  c.stage2.user_match_negatives = "prompt"
  c.stage2.user_match_weight, c.stage2.user_match_batch = 1.0, 8   # prompt negatives
  c.stage2.train_lora, c.llm.lora_rank, c.llm.lora_targets = True, 0, "q,x"
  work = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    runner.train_and_evaluate(c, work)
  msg = str(e.value)
  assert msg.startswith("invalid config: ") and "\n" not in msg
  for part in ("--config.cf.lr=-1.0 must be > 0", "--config.stage2.batch_size=0 must be > 0",
               "--config.stage2.max_steps=-3 must be >= 0",
               f"--config.llm.path='{tmp_path / 'no_such_llm'}' does not exist",
               "--config.eval.baselines: unknown baseline(s) ['genre_x']; known: ['cf', "
               "'llm_only', 'mlp_llm', 'no_items', 'no_user', 'popularity', 'random_items', "
                   "'sbert', 'tallrec']",
               "--config.llm.lora_targets='q,x': unknown projection(s) ['x']",
               "--config.stage2.train_lora=True needs --config.llm.lora_rank > 0",
               "--config.eval.baselines=tallrec needs --config.llm.lora_rank > 0",
               "--config.stage2.user_match_batch > 0 needs "
               "--config.stage2.user_match_negatives=catalog"):
    assert part in msg, part
  assert not work.exists()          # nothing was trained, no config.json written
  run_config.validate_config(ml100k.get_config())   # the shipped configs pass
  from configs import ml100k_long  # pylint: disable=g-import-not-at-top
  run_config.validate_config(ml100k_long.get_config())


def test_finished_stage_under_another_config_is_refused(tmp_path):
  """config.json never lies: a field that produced a finished stage cannot change (one-line
  error naming it), a field of an unfinished stage can, and the change is logged."""
  work = tmp_path / "run"
  c = ml100k.get_config()
  run_config.save_config(c, work)
  (work / "cf").mkdir()
  (work / "cf" / "FINISHED").write_text("{}\n")
  longer = ml100k.get_config()
  longer.stage2.max_steps = 900            # stage 2 not finished: allowed, and recorded
  longer.mesh.shape = (1, 1, 1)            # neutral
  run_config.save_config(longer, work)
  hist = [json.loads(l) for l in (work / "config_history.jsonl").read_text().splitlines()]
  assert hist == [{"changed": {"stage2.max_steps": [c.stage2.max_steps, 900]}}]
  assert json.loads((work / "config.json").read_text())["stage2"]["max_steps"] == 900
  other = ml100k.get_config()
  other.stage2.max_steps = 900
  other.cf.lr = 0.01
  with pytest.raises(ValueError, match=r"finished stage\(s\) cf were produced with another "
                     r"config \(cf\.lr: 0\.001 -> 0\.01\); use a new --workdir"):
    run_config.save_config(other, work)
  assert json.loads((work / "config.json").read_text())["cf"]["lr"] == 0.001
  (work / "stage1").mkdir()
  (work / "stage1" / "FINISHED").write_text("{}")
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
  run_config.save_config(longer, work)
  hist = [json.loads(l) for l in (work / "config_history.jsonl").read_text().splitlines()]
  assert hist[-1] == {"changed": {"cf.retired_option": [3, None]}}


def test_recommend_refuses_an_unfinished_run(tmp_path):
  from allmrec_jax import recommend  # pylint: disable=import-outside-toplevel
  (tmp_path / "cf").mkdir()
  (tmp_path / "cf" / "FINISHED").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no finished stage1 stage"):
    recommend.check_run(tmp_path)
  out = subprocess.run([sys.executable, "-m", "launch.recommend", f"--workdir={tmp_path}",
                        "--user=1"], capture_output=True, text=True, check=False)
  assert out.returncode != 0
  assert "no finished stage1 stage" in out.stderr
  assert "Traceback" not in out.stderr
