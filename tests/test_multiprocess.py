"""Two processes on this machine (jax.distributed over localhost, gloo CPU collectives)
against one, for every stage, through the trainers' own entry points:

- CF (`cf.train_and_evaluate`): every process runs each epoch replicated on the whole global
  batches, which must be the one-process batches; the trained parameters agree in both
  processes and with one process, and so do the losses and the validation metrics.
- stage 1 (`stage1.train_and_evaluate`, SBERT fine-tuned on packed texts) and stage 2
  (`iterate_batches(shard=(process, count))` + `Stage2Trainer.step`, as `stage2.train`
  runs them): each step's global batch, gathered from the devices
  (`multihost_utils.process_allgather` of what `sharding.put_batch` placed), is the
  one-process batch, nothing dropped or repeated; the losses and the trained parameters
  match one process.
- the stage-2 evaluation (`evaluate.LLMEvaluator` given the mesh: ranking with greedy
  generation, and `generate_texts`): each process runs its own rows of every group of
  users, so every user is scored exactly once across the processes (a tail group padded),
  and both processes get the one-process metrics and texts.

The two workers and the one-process reference run once, side by side, for the whole module
(`runs`); each test checks one stage. A worker records what each step was fed by wrapping
`sharding.put_batch` (and CF's jitted epoch), which users' rows its devices held in
evaluation by wrapping the evaluator's `_inputs`, and prints its results as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from allmrec_jax import testing

NUM_USERS, NUM_ITEMS, MAXLEN = 16, 130, 8
WORDS = ("Star", "Wars", "Toy", "Story", "Heat", "Casino", "Fargo", "Babe", "Alien", "Dune",
         "Night", "City", "Love", "War", "Blue", "Red")
STEPS = 2                    # training steps of stage 1 and stage 2
EVAL_USERS, EVAL_BATCH = 5, 2     # two processes: a group of 4 users, then 1 + 3 padding


def _dataset():
  """16 users of 6-11 items over 130 titled items (every user has valid / test targets)."""
  from allmrec_jax.data import dataset as dataset_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  lengths = rng.integers(6, 12, size=NUM_USERS)
  items = np.concatenate([rng.choice(np.arange(1, NUM_ITEMS + 1), size=n, replace=False)
                          for n in lengths])
  titles = [""] + [f"{' '.join(rng.choice(WORDS, size=rng.integers(1, 3)))} ({1950 + i % 50})"
                   for i in range(1, NUM_ITEMS + 1)]
  return dataset_lib.build_dataset(
      name="mp-tiny", domain="movies", seq_offsets=np.concatenate([[0], np.cumsum(lengths)]),
      seq_items=items, num_items=NUM_ITEMS, titles=titles,
      descriptions=[""] * (NUM_ITEMS + 1), genres=[[] for _ in range(NUM_ITEMS + 1)],
      candidate_seed=3)


def _config(assets: pathlib.Path):
  from configs import base  # pylint: disable=import-outside-toplevel
  c = base.get_base_config()
  c.data.maxlen = MAXLEN
  c.mesh.shape = (-1, 1, 1)            # one device per process: data over the processes
  c.cf.update(hidden_dim=12, num_blocks=1, batch_size=8, num_epochs=3, eval_every=2,
              eval_batch_size=32, progress=False)     # stopped after epoch 2
  c.sbert.path, c.sbert.max_len = str(assets / "sbert"), 24
  c.stage1.update(batch_size=4, max_steps=STEPS, latent_dim=8, eval_batch_size=32)
  c.stage2.update(batch_size=4, num_history=3, num_candidates=5)
  return c


def _user_rep(seq: np.ndarray) -> np.ndarray:
  """float32[X, 4] a stand-in for the CF model's x_u."""
  return (seq[:, -4:] % 7).astype(np.float32)


def _digest(tree) -> str:
  """sha256 of a dict of arrays (nested dicts included)."""
  h = hashlib.sha256()
  for k in sorted(tree):
    v = tree[k]
    if isinstance(v, dict):
      h.update(f"{k}:{_digest(v)}".encode())
      continue
    v = np.ascontiguousarray(v)
    h.update(f"{k}:{v.dtype}:{v.shape}".encode())
    h.update(v.tobytes())
  return h.hexdigest()[:16]


def _checksum(tree) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(tree)))


def _losses(stage_dir: pathlib.Path) -> list[float]:
  rows = [json.loads(r) for r in (stage_dir / "metrics.jsonl").read_text().splitlines() if r]
  return [r["train/loss"] for r in rows]


def _floats(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not k.endswith(("time_s", "per_s", "seconds"))}


def _record_batches(fed: list[str]) -> None:
  """Appends to `fed` the digest of every global training batch: what `sharding.put_batch`
  placed, gathered from all devices, and the numpy batches of each CF epoch call."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from allmrec_jax import sharding  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import cf  # pylint: disable=import-outside-toplevel
  # pylint: disable=protected-access
  put_batch, jitted_epoch, depth = sharding.put_batch, cf._jitted_epoch, []

  def gathered_put_batch(mesh, arrays, **kw):
    depth.append(1)                         # put_batch calls itself on nested dicts
    try:
      out = put_batch(mesh, arrays, **kw)
    finally:
      depth.pop()
    if not depth:
      fed.append(_digest(jax.tree.map(
          lambda x: multihost_utils.process_allgather(x, tiled=True), out)))
    return out

  def recorded_epoch(*args):
    fn = jitted_epoch(*args)

    def run(state, batches, key):
      fed.append(_digest(batches))
      return fn(state, batches, key)
    return run
  sharding.put_batch, cf._jitted_epoch = gathered_put_batch, recorded_epoch


def _cf_and_stage1(ds, config, workdir: pathlib.Path, fed: list[str]) -> dict:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import cf, stage1  # pylint: disable=import-outside-toplevel
  model, params, m = cf.train_and_evaluate(config, workdir, ds, stop_after_epoch=2)
  out = {"cf": {"fed": fed[:], "params": _checksum(params), "metrics": _floats(m),
                "losses": _losses(workdir / "cf")}}
  fed.clear()
  seq = np.ones((1, MAXLEN), np.int32)
  cf_params = nn.unbox(model.init(jax.random.key(1), seq, seq, seq))
  m = stage1.train_and_evaluate(config, workdir, ds, model, cf_params)
  trained = stage1.load_trained_stage1(config, workdir).params
  out["stage1"] = {"fed": fed[:], "metrics": _floats(m), "losses": _losses(workdir / "stage1"),
                   "params": _checksum({k: trained[k] for k in ("item_ae", "text_ae")}),
                   "sbert": _checksum(trained["sbert"])}
  fed.clear()
  return out


def _stage2_and_eval(ds, config, assets: pathlib.Path, fed: list[str]) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from allmrec_jax import sharding  # pylint: disable=import-outside-toplevel
  from allmrec_jax.data import pipelines  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models import projectors as projectors_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2, stage2_run  # pylint: disable=import-outside-toplevel
  from allmrec_jax.weights import llm as llm_weights  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  loaded = llm_weights.load_llm(assets / "llm", mesh=mesh)
  llm_params = {"params": loaded.params}
  builder = stage2_run.prompt_builder(ds, loaded.tokenizer, config.stage2)
  table = np.random.default_rng(0).uniform(size=(NUM_ITEMS + 1, 8)).astype(np.float32)
  ex = stage2.training_examples(ds, maxlen=MAXLEN, num_history=3)
  proj = projectors_lib.Stage2Projectors(8, 4, loaded.config.embed_dim)
  trainer = stage2.Stage2Trainer(llm=loaded.module, llm_params=llm_params, projectors=proj,
                                 item_table=table, optimizer=optax.adam(1e-3), mesh=mesh)
  state = trainer.init_state(stage2.init_projectors(proj, jax.random.PRNGKey(0), 8, 4))
  losses = []
  for _, arrays in stage2.iterate_batches(       # sharded as stage2.train shards them
      ex, _user_rep(ex.seq), builder, ds, pipelines.train_exclusion_index(ds),
      batch_size=4, num_candidates=5, seed=0, epoch=0,
      shard=(jax.process_index(), jax.process_count())):
    state, m = trainer.step(state, arrays)
    losses.append(float(jax.device_get(m["train/loss"])))
    if len(losses) == STEPS:
      break
  params = jax.device_get(state["params"])
  out = {"stage2": {"fed": fed[:], "params": _checksum(params), "losses": losses}}

  es = eval_lib.make_eval_set(ds, "test", maxlen=MAXLEN, num_history=3,
                              max_users=EVAL_USERS, seed=0)
  ev = eval_lib.LLMEvaluator(
      llm=loaded.module, llm_params=llm_params, tokenizer=loaded.tokenizer, builder=builder,
      titles=ds.titles, projectors=proj, item_table=table, batch_size=EVAL_BATCH,
      max_new_tokens=6, mesh=mesh)
  scored: list[int] = []
  inputs = ev._inputs  # pylint: disable=protected-access

  def recorded_inputs(sub, arrays):   # the users whose rows this process's devices hold
    placed = inputs(sub, arrays)
    rows = {r for s in placed["attention_mask"].addressable_shards
            for r in range(*s.index[0].indices(len(sub.users))[:2])}
    scored.extend(int(sub.users[r]) for r in sorted(rows)       # not the tail's padding,
                  if r == 0 or sub.users[r] != sub.users[0])     # which repeats row 0
    return placed
  ev._inputs = recorded_inputs  # pylint: disable=protected-access
  res = ev.evaluate(params, es, _user_rep(es.seq))
  out["eval"] = {"scored": scored[:], "users": es.users.tolist(), "texts": res["texts"],
                 "metrics": eval_lib.llm_metrics(res, "test/")}
  scored.clear()
  out["eval"]["genre"] = ev.generate_texts(params, es, _user_rep(es.seq), task="genre")
  out["eval"]["genre_scored"] = scored[:]
  return out


def _worker(process: int, count: int, port: int, assets: str, workdir: str):
  """One process of `count` (count 1: no jax.distributed); prints `RESULT <json>`."""
  import jax  # pylint: disable=import-outside-toplevel
  if count > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=count, process_id=process)
  assert jax.process_count() == count and len(jax.devices()) == count
  ds, config = _dataset(), _config(pathlib.Path(assets))
  fed: list[str] = []
  _record_batches(fed)
  out = _cf_and_stage1(ds, config, pathlib.Path(workdir), fed)
  out.update(_stage2_and_eval(ds, config, pathlib.Path(assets), fed))
  print("RESULT " + json.dumps(out), flush=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> pathlib.Path:
  """A tiny random Llama (SmolLM2's tokenizer) and a one-layer SBERT (MiniLM's)."""
  root = tmp_path_factory.mktemp("assets")
  testing.write_tiny_llama(root / "llm")
  testing.write_tiny_sbert(root / "sbert", layers=1)
  return root


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, list[dict]]:
  """{stage: [process 0's, process 1's, the one-process run's]} results (the three
  processes run side by side)."""
  root = tmp_path_factory.mktemp("multiprocess")
  port = _free_port()
  jobs = [(0, 2, root / "two"), (1, 2, root / "two"), (0, 1, root / "one")]
  procs = [subprocess.Popen([sys.executable, __file__, str(p), str(n), str(port),
                             str(assets), str(wd)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=testing.one_device_env())
           for p, n, wd in jobs]
  try:
    outs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  got = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
         for out, _ in outs]
  return {stage: [g[stage] for g in got] for stage in got[0]}


def _assert_close(got: dict[str, float], want: dict[str, float], rtol: float):
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=rtol, abs=1e-6 if rtol else 0, nan_ok=True), k


@pytest.mark.slow
def test_cf_processes_train_as_one(runs):
  two0, two1, one = runs["cf"]
  assert len(one["fed"]) == 2                         # one call per epoch
  assert two0["fed"] == two1["fed"] == one["fed"]     # the whole global batches everywhere
  assert two0["params"] == two1["params"]             # the replicas never drift apart
  assert two0["params"] == pytest.approx(one["params"], rel=1e-6)
  assert two0["losses"] == pytest.approx(one["losses"], rel=1e-6)
  _assert_close(two0["metrics"], one["metrics"], 1e-6)
  _assert_close(two1["metrics"], two0["metrics"], 0.0)
  assert one["metrics"]["valid/num_users"] == NUM_USERS     # every user, in every process


@pytest.mark.slow
def test_stage1_global_batches_equal_one_process(runs):
  two0, two1, one = runs["stage1"]
  assert len(one["fed"]) == STEPS
  assert two0["fed"] == two1["fed"] == one["fed"]
  assert two0["losses"] == pytest.approx(one["losses"], rel=1e-5)
  for k in ("params", "sbert"):
    assert two0[k] == two1[k]
    assert two0[k] == pytest.approx(one[k], rel=1e-5)
  _assert_close(two0["metrics"], one["metrics"], 1e-4)
  _assert_close(two1["metrics"], two0["metrics"], 0.0)


@pytest.mark.slow
def test_stage2_global_batches_equal_one_process(runs):
  two0, two1, one = runs["stage2"]
  assert len(one["fed"]) == STEPS
  assert two0["fed"] == two1["fed"] == one["fed"]
  assert two0["losses"] == pytest.approx(one["losses"], rel=1e-5)
  assert two0["params"] == two1["params"]
  assert two0["params"] == pytest.approx(one["params"], rel=1e-5)


@pytest.mark.slow
def test_ranking_evaluation_equals_one_process(runs):
  two0, two1, one = runs["eval"]
  assert two0["users"] == two1["users"] == one["users"]
  assert len(one["users"]) == EVAL_USERS
  for key in ("scored", "genre_scored"):
    assert sorted(one[key]) == sorted(one["users"]), key      # once each in one process
    assert set(two0[key]) | set(two1[key]) == set(one["users"]), key
  _assert_close(two0["metrics"], one["metrics"], 1e-5)
  _assert_close(two1["metrics"], two0["metrics"], 0.0)
  assert "test/gen_hit@1" in one["metrics"]
  for key in ("texts", "genre"):              # every process holds every user's answer
    assert len(one[key]) == EVAL_USERS, key
    assert two0[key] == two1[key] == one[key], key


@pytest.mark.slow
def test_ranking_evaluation_scores_each_user_once_across_processes(runs):
  two0, two1, _ = runs["eval"]
  for key in ("scored", "genre_scored"):      # ranking + generation, then generate_texts
    assert two0[key] and two1[key], key       # both processes did part of the work
    assert not set(two0[key]) & set(two1[key]), key
    assert sorted(two0[key] + two1[key]) == sorted(two0["users"]), key


def test_stage2_process_rows_join_into_the_one_process_batch(assets):
  """Host side only: the rows `iterate_batches` builds in process 0 and in process 1 of 2,
  stacked, are the batch one process builds (default len_bucket)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from allmrec_jax.data import pipelines  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2, stage2_run  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  ds, cfg = _dataset(), base.get_base_config().stage2
  cfg.num_history, cfg.num_candidates = 3, 5
  tok = AutoTokenizer.from_pretrained(str(assets / "llm"))
  tok.pad_token = tok.pad_token or tok.eos_token
  builder = stage2_run.prompt_builder(ds, tok, cfg)
  ex = stage2.training_examples(ds, maxlen=MAXLEN, num_history=3)

  def batches(shard):
    return [a for _, a in stage2.iterate_batches(
        ex, _user_rep(ex.seq), builder, ds, pipelines.train_exclusion_index(ds),
        batch_size=4, num_candidates=5, seed=0, epoch=0, shard=shard)]
  one, rows0, rows1 = batches((0, 1)), batches((0, 2)), batches((1, 2))
  assert len(one) == len(rows0) == len(rows1) == NUM_USERS // 4
  for b, b0, b1 in zip(one, rows0, rows1):
    for k, v in b.items():
      assert b0[k].shape == b1[k].shape, k
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), v, err_msg=k)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
