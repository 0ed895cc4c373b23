"""launch/tables.py's library path on tiny models: every part of the paper's tables from
one run folder, reused on a rerun; the Amazon cross-domain path on a generated pair of
categories; bad input; the stand-in item tables of experiments/gpu_tables.py."""

import gzip
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
import types

import filelock
import numpy as np
import pytest

from allmrec_jax import testing
from allmrec_jax.data import scenarios
from allmrec_jax.paper_tables import ablations
from allmrec_jax.paper_tables import suite as tables
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import runner
from configs import base
from configs import ml100k

ROOT = pathlib.Path(__file__).resolve().parents[2]
LLAMA = dict(hidden=32, inter=64, layers=2, heads=4, kv_heads=2)   # a tiny random Llama


def _tiny(c, tmp_path, write=True):
  """Tiny models and budgets: a run of every part in minutes on a CPU (`write=False`: the
  tiny models written to `tmp_path` before)."""
  if write:
    testing.write_tiny_llama(tmp_path / "llm", **LLAMA)
    testing.write_tiny_sbert(tmp_path / "sbert")
  c.llm.path, c.sbert.path = str(tmp_path / "llm"), str(tmp_path / "sbert")
  c.sbert.max_len = 32
  c.cf.num_epochs, c.cf.eval_every = 1, 1
  c.cf.grad_splits = 1             # the same objective as 4 row blocks, one quicker compile
  c.stage1.max_steps = 1
  c.stage2.max_steps, c.stage2.batch_size = 1, 2
  c.stage2.len_bucket = 512        # every prompt one length: the variants share programs
  c.eval.max_new_tokens, c.eval.batch_size = 2, 4
  c.mesh.shape = (1, 1, 1)         # one device: sharded runs are tested end to end elsewhere
  return c


def _check_rows(result, n_users):
  for rec in result["rows"]:
    m = rec["all"]
    assert m["users"] == n_users, rec["model"]
    hit1, hit5, mrr = m["hit@1"], m["hit@5"], m["mrr"]
    assert abs(hit1 * n_users - round(hit1 * n_users)) < 1e-6, rec["model"]   # k / n
    assert hit1 <= hit5 and hit1 <= mrr <= (1 + hit1) / 2 + 1e-9, rec["model"]
    assert mrr >= 1 / 20, rec["model"]


def _base_config(models_dir, write):
  c = _tiny(ml100k.get_config(), models_dir, write)
  c.llm.matmul_dtype = c.sbert.matmul_dtype = ""
  c.stages = "cf,stage1"
  return c


def _base_run(tmp_path, tmp_path_factory, worker_id):
  """The tiny run every part starts from: CF and stage 1 finished on MovieLens-100K.

  Trained once per pytest run (the first of the tests below to get here trains it under a
  file lock; under xdist the workers share the folder above their own temporary folders)
  and copied into each test's folder, where its parts are added."""
  base = tmp_path_factory.getbasetemp()
  shared = (base if worker_id == "master" else base.parent) / "tables_base_run"
  with filelock.FileLock(f"{shared}.lock"):
    if not (shared / "run" / "stage1" / "FINISHED").exists():
      shared.mkdir(exist_ok=True)
      runner.train_and_evaluate(_base_config(shared, write=True), shared / "run")
  c = _base_config(shared, write=False)
  work = tmp_path / "run"
  shutil.copytree(shared / "run", work, symlinks=True)
  return c, work


def _suite(c, work):
  return tables.PaperTables(c, work, users=4, few_shot=(16,), backbones=("sasrec", "ncf"),
                            efficiency_steps=2)


def _run_parts(suite, work, parts):
  """Runs `parts`; checks each one's document section and rows; returns {part: json}."""
  text = suite.run(parts, command="allmrec-tables ...").read_text()
  out = {}
  for part in parts:
    out[part] = result = json.loads((work / "tables" / f"{part}.json").read_text())
    assert f"## {result['title']}" in text, part
    if part not in ("efficiency", "cold_warm"):      # those two are checked by the caller
      _check_rows(result, result["rows"][0]["all"]["users"])
  return out


# Every part of tables.PARTS is run by one of the three tests below (the parts are split
# so that the tests run side by side on the suite's workers).


@pytest.mark.slow
def test_default_parts_tiny(tmp_path, monkeypatch, tmp_path_factory, worker_id):
  """overall, cold_warm, efficiency (the default selection), then a rerun that reads
  every finished model back."""
  c, work = _base_run(tmp_path, tmp_path_factory, worker_id)
  suite = _suite(c, work)
  got = _run_parts(suite, work, list(tables.DEFAULT_PARTS))
  assert (work / "tables" / "overall.png").stat().st_size > 1000

  overall = got["overall"]
  assert [r["model"] for r in overall["rows"]] == [
      "SASRec", "NCF", "popularity", "LLM-Only", "TALLRec", "MLP-LLM", "A-LLMRec (SBERT)",
      "A-LLMRec"]
  assert all(r["all"]["users"] == 4 for r in overall["rows"])
  assert "gen_hit@1" not in overall["rows"][0]["all"]            # CF rows: ranking only
  assert all("gen_hit@1" in r["all"] for r in overall["rows"][3:])
  # The SASRec row is the run's own CF model scored on the suite's users.
  assert suite.cf_row("sasrec").metrics() == pytest.approx(
      overall["rows"][0]["all"])

  # cold / warm: the same per-user ranks split by the target's interaction count.
  cold, warm = scenarios.cold_warm_items(suite.ds, c.data.cold_fraction)
  n_cold = int(np.isin(suite.es.targets, cold).sum())
  n_warm = int(np.isin(suite.es.targets, warm).sum())
  for rec, full in zip(got["cold_warm"]["rows"], overall["rows"]):
    assert rec["model"] == full["model"]
    assert rec["cold"]["users"] == n_cold and rec["warm"]["users"] == n_warm
    if n_cold + n_warm == 4:     # every target cold or warm: the parts recompose the whole
      assert (n_cold * rec["cold"].get("hit@1", 0) + n_warm * rec["warm"].get("hit@1", 0)
              == pytest.approx(4 * full["all"]["hit@1"]))

  eff = got["efficiency"]
  assert [r["label"] for r in eff["rows"]] == (
      ["A-LLMRec (frozen LLM, paper)", "A-LLMRec (LoRA, this run)", "TALLRec"]
      if c.stage2.train_lora else ["A-LLMRec", "TALLRec"])
  for r in eff["rows"]:
    assert r["seconds_per_step"] > 0 and r["seconds_per_user"] > 0
    assert r["seconds_per_epoch"] == pytest.approx(r["seconds_per_step"] *
                                                   r["steps_per_epoch"])

  # A rerun reads every finished model back: no evaluation file is written again.
  evals = sorted((work / "tables" / "eval").rglob("*.json"))
  stamps = [p.stat().st_mtime_ns for p in evals]
  again = _suite(c, work)
  again.run(["overall", "cold_warm"])
  assert [p.stat().st_mtime_ns for p in sorted((work / "tables" / "eval").rglob("*.json"))
          ] == stamps
  assert "loaded" not in again.__dict__          # the LLM was never loaded
  assert json.loads((work / "tables" / "overall.json").read_text())["rows"] == overall["rows"]

  # experiments/gpu_tables.py (a study script): the exported item tables stand in for
  # stage 1's checkpoint.
  spec = importlib.util.spec_from_file_location("gpu_tables",
                                                ROOT / "experiments" / "gpu_tables.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  path = str(tmp_path / "item_tables.npz")
  script._export(c, work, path)                  # pylint: disable=protected-access
  monkeypatch.setattr(item_tables_lib, "item_tables", item_tables_lib.item_tables)  # restored
  script._use_item_tables(work, path)            # pylint: disable=protected-access
  got = item_tables_lib.item_tables(c, work, suite.ds, None, None)
  for key in script.KEYS:
    np.testing.assert_array_equal(got[key], suite.stage2_run("base").item_tables[key])
  small = types.SimpleNamespace(num_items=suite.ds.num_items - 1)   # another catalogue
  with pytest.raises(ValueError, match="--item_tables=.* rows"):
    item_tables_lib.item_tables(c, work, small, None, None)
  partial = tmp_path / "partial.npz"
  np.savez(partial, cf=got["cf"])
  with pytest.raises(ValueError, match=r"--item_tables=.*missing arrays \['joint', 'text'\]"):
    script._use_item_tables(work, str(partial))   # pylint: disable=protected-access
  with pytest.raises(FileNotFoundError, match="--item_tables=.*nothing.npz: no such file"):
    script._use_item_tables(work, str(tmp_path / "nothing.npz"))   # pylint: disable=protected-access


@pytest.mark.slow
def test_scenario_parts_tiny(tmp_path, tmp_path_factory, worker_id):
  """cold_users, few_shot (stage 2 on the K users, then the paper's scope: every stage on
  them) and the MovieLens genre-split cross_domain."""
  c, work = _base_run(tmp_path, tmp_path_factory, worker_id)
  got = _run_parts(_suite(c, work), work, ["cold_users", "few_shot", "cross_domain"])
  cu = got["cold_users"]
  assert cu["rows"][0]["all"]["users"] == c.data.num_cold_users
  assert [r["model"] for r in cu["rows"]] == ["SASRec", "popularity", "LLM-Only", "A-LLMRec"]
  assert [r["model"] for r in got["few_shot"]["rows"]][1:] == [
      "TALLRec (K=16)", "A-LLMRec (K=16)", "A-LLMRec (SBERT) (K=16)"]
  # Few-shot stage 2 saw only the K users' examples: one pass of K examples is K / batch
  # steps, but max_steps=1 caps it, so check the trainer's example set instead.
  assert (work / "stage2_few_shot16_allmrec" / "ckpt").is_dir()
  assert [r["model"] for r in got["cross_domain"]["rows"]] == [
      "popularity", "LLM-Only", "TALLRec", "A-LLMRec", "A-LLMRec (SBERT)"]
  # The paper's few-shot: CF model, stage 1 and stage 2 all trained on the K users only.
  paper = tables.PaperTables(c, work, users=4, few_shot=(16,), few_shot_scope="all")
  shot = _run_parts(paper, work, ["few_shot"])["few_shot"]
  assert [r["model"] for r in shot["rows"]] == [
      "SASRec (all users)", "SASRec (K=16)", "TALLRec (K=16)", "A-LLMRec (K=16)",
      "A-LLMRec (SBERT) (K=16)"]
  variant = work / "tables" / "few_shot16_all"
  assert json.loads((variant / "cf" / "metrics.json").read_text())["test/num_users"] == 16
  assert (variant / "stage1" / "FINISHED").exists()
  assert (variant / "stage2_few_shot16_allmrec" / "ckpt").is_dir()


@pytest.mark.slow
def test_model_parts_tiny(tmp_path, tmp_path_factory, worker_id):
  """model_agnostic (a second backbone trained end to end) and the ablations."""
  c, work = _base_run(tmp_path, tmp_path_factory, worker_id)
  got = _run_parts(_suite(c, work), work, ["model_agnostic", "ablations"])
  assert [r["model"] for r in got["model_agnostic"]["rows"]] == [
      "SASRec", "A-LLMRec (SASRec)", "NCF", "A-LLMRec (NCF)"]
  assert (work / "tables" / "backbone_ncf" / "stage1" / "FINISHED").exists()
  ab = got["ablations"]
  assert len(ab["rows"]) == 1 + len(ablations.STAGE1_ABLATIONS) + len(ablations.STAGE2_ABLATIONS)
  assert (work / "tables" / "stage1_no_match" / "cf").is_symlink()
  s1 = json.loads((work / "tables" / "stage1_no_match" / "config.json").read_text())
  assert s1["stage1"]["w_match"] == 0.0


def _write_amazon_pair(directory, seed=0):
  """Two Amazon-2018 categories (Movies_and_TV, Video_Games) of 40 users x 6-9 reviews over
  50 items each, titled and described, in the raw formats."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True)
  for cat, noun in (("Movies_and_TV", "Film"), ("Video_Games", "Game")):
    reviews, meta = [], []
    for i in range(50):
      meta.append(json.dumps({"asin": f"{cat[:2]}{i}", "title": f"{noun} number {i}",
                              "description": [f"A {noun.lower()} about topic {i % 7}"]}))
    for u in range(40):
      items = rng.choice(50, size=int(rng.integers(6, 10)), replace=False)
      for t, i in enumerate(items):
        reviews.append(json.dumps({"reviewerID": f"U{u}", "asin": f"{cat[:2]}{i}",
                                   "overall": 5.0, "unixReviewTime": 1000 + t}))
    for name, lines in ((f"{cat}.json.gz", reviews), (f"meta_{cat}.json.gz", meta)):
      with gzip.open(directory / name, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
  return directory


@pytest.mark.slow
def test_cross_domain_amazon_pair(tmp_path):
  raw = _write_amazon_pair(tmp_path / "raw")
  c = _tiny(base.get_base_config(), tmp_path)
  c.data.dataset = f"amazon2018:{raw}:Movies_and_TV"
  c.data.data_dir = str(tmp_path / "processed")
  c.stages = "cf,stage1"
  work = tmp_path / "movies"
  runner.train_and_evaluate(c, work)
  suite = tables.PaperTables(c, work, users=4,
                             cross_domain_target=f"amazon2018:{raw}:Video_Games")
  suite.run(["cross_domain"])
  xd = json.loads((work / "tables" / "cross_domain.json").read_text())
  assert "Video_Games" in xd["title"] and "Movies_and_TV" in xd["title"]
  _check_rows(xd, 4)
  texts = json.loads((work / "tables" / "eval" / "cross_domain" / "allmrec.json").read_text())
  # The answers are about the target domain's prompts (its titles are games).
  assert len(texts["rank"]) == 4
  assert (work / "stage2" / "ckpt").is_dir()          # trained on the source category
  # --cross_domain_user=decoded: x_u from the source CF model over stage 1's decoding of the
  # target items' text embeddings; the models trained on the source are reused and only the
  # two soft-prompt rows are evaluated again.
  evals = work / "tables" / "eval" / "cross_domain"
  stamps = {p.name: p.stat().st_mtime_ns for p in evals.glob("*.json")}
  decoded = tables.PaperTables(c, work, users=4, cross_domain_user="decoded",
                               cross_domain_target=f"amazon2018:{raw}:Video_Games")
  decoded.run(["cross_domain"])
  xd2 = json.loads((work / "tables" / "cross_domain.json").read_text())
  assert "text-decoded item embeddings" in xd2["title"]
  _check_rows(xd2, 4)
  assert xd2["rows"][:3] == xd["rows"][:3]            # popularity, LLM-Only, TALLRec
  assert {p.name: p.stat().st_mtime_ns for p in evals.glob("*.json")
          if p.name in stamps} == stamps
  assert {"allmrec_decoded_user.json", "sbert_decoded_user.json"} <= {
      p.name for p in evals.glob("*.json")}
  x_u = decoded._runs["cross_domain"].user_rep        # pylint: disable=protected-access
  assert x_u.shape[0] == 4 and np.isfinite(x_u).all() and np.ptp(x_u, axis=0).max() > 0


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match="--parts: unknown part"):
    tables.parse_parts("overall,tables")
  assert tables.parse_parts("all") == list(tables.PARTS)
  c = ml100k.get_config()
  with pytest.raises(FileNotFoundError, match="cf, stage1 not finished"):
    tables.PaperTables(c, tmp_path / "nothing")
  with pytest.raises(ValueError, match="--few_shot_scope='cf': one of"):
    tables.PaperTables(c, tmp_path / "nothing", few_shot_scope="cf")
  with pytest.raises(ValueError, match="--cross_domain_user='cf': one of"):
    tables.PaperTables(c, tmp_path / "nothing", cross_domain_user="cf")
  ncf = ml100k.get_config()
  ncf.cf.model = "ncf"
  with pytest.raises(ValueError, match="--cross_domain_user=decoded: NCF"):
    tables.PaperTables(ncf, tmp_path / "nothing", cross_domain_user="decoded")
  out = subprocess.run([sys.executable, "launch/tables.py", "--config=configs/ml100k.py",
                        f"--workdir={tmp_path}", "--parts=overall,bogus"],
                       capture_output=True, text=True, check=False)
  assert out.returncode != 0 and "--parts: unknown part(s) ['bogus']" in out.stderr
