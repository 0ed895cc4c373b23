"""CF trainer end to end on a tiny learnable dataset: learning, files, resume, skip, load."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from allmrec_jax.trainers import cf as cf_trainer

from conftest import tiny_config  # pylint: disable=g-bad-import-order


def _jsonl(path):
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _assert_same_run(m_a, params_a, m_b, params_b):
  """Same final metrics (timing aside) and parameters."""
  for k, v in m_a.items():
    if k.endswith("time_s") or not isinstance(v, float):
      continue
    assert m_b[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               params_a, params_b)


def test_train_resume_skip_load(tmp_path, pattern_dataset):
  """Tiny end-to-end run; an interrupted + resumed run equals the uninterrupted one."""
  config = tiny_config("sasrec", num_epochs=6, eval_every=3)
  wd_a, wd_b = tmp_path / "a", tmp_path / "b"
  _, params_a, m_a = cf_trainer.train_and_evaluate(config, wd_a, pattern_dataset)

  assert m_a["test/num_users"] == pattern_dataset.eval_users("test").size
  for key in ("test/hit@1", "test/hit@5", "test/mrr", "test/hr@10_neg100",
              "test/ndcg@10_neg100", "test/recall@10", "test/recall@20", "test/ndcg@10",
              "test/ndcg@20", "valid/hit@1"):
    assert 0.0 <= m_a[key] <= 1.0, key
  assert "test/warm/hit@1" in m_a and "test/cold/num_users" in m_a  # item-group breakdown
  out = wd_a / "cf"
  assert (out / "FINISHED").exists() and (out / "metrics.json").exists()
  log = _jsonl(out / "metrics.jsonl")
  assert [r["epoch"] for r in log] == list(range(1, 7))
  assert all("valid/ndcg@10_neg100" in r for r in log if r["epoch"] % 3 == 0)
  assert log[-1]["train/loss"] < log[0]["train/loss"]
  assert any(p.name.startswith("events") for p in (out / "tb").iterdir())

  # Interrupted after epoch 3, then resumed: identical to the uninterrupted run.
  cf_trainer.train_and_evaluate(config, wd_b, pattern_dataset, stop_after_epoch=3)
  assert not (wd_b / "cf" / "FINISHED").exists()
  _, params_b, m_b = cf_trainer.train_and_evaluate(config, wd_b, pattern_dataset)
  _assert_same_run(m_a, params_a, m_b, params_b)
  assert [r["train/loss"] for r in _jsonl(wd_b / "cf" / "metrics.jsonl")] == pytest.approx(
      [r["train/loss"] for r in log], rel=1e-6)

  # A finished stage is skipped and returns the stored result; load gives the best params.
  _, _, m_c = cf_trainer.train_and_evaluate(config, wd_a, pattern_dataset)
  assert m_c == json.loads((out / "metrics.json").read_text())
  model, params_d = cf_trainer.load_trained_cf(config, wd_a, pattern_dataset)
  best = cf_trainer.checkpointing.restore(
      cf_trainer.checkpointing.make_manager(out / "ckpt", best_metric=config.cf.select_metric,
                                            read_only=True),
      step=m_a["best_epoch"])
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), best["params"], params_d)
  user = model.apply({"params": params_d}, pattern_dataset.history_matrix("test", 12)[:4],
                     method="user_representation")
  assert user.shape == (4, 16)


@pytest.mark.slow
def test_sasrec_learns(tmp_path, pattern_dataset):
  config = tiny_config("sasrec", num_epochs=30, eval_every=10)
  _, _, m = cf_trainer.train_and_evaluate(config, tmp_path, pattern_dataset)
  # Learns the ring walk: far above the random 1/20 and 10/101.
  assert m["test/hit@1"] > 0.3, m
  assert m["test/hr@10_neg100"] > 0.5, m


def test_load_without_checkpoint(tmp_path, pattern_dataset):
  with pytest.raises(FileNotFoundError, match="stages=cf"):
    cf_trainer.load_trained_cf(tiny_config(), tmp_path, pattern_dataset)


def test_bad_loss_name(tmp_path, pattern_dataset):
  config = tiny_config()
  config.cf.loss = "hinge"
  with pytest.raises(ValueError, match="config.cf.loss"):
    cf_trainer.train_and_evaluate(config, tmp_path, pattern_dataset)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ncf", "gru4rec", "nextitnet"])
def test_other_backbones_train(tmp_path, pattern_dataset, name):
  config = tiny_config(name, num_epochs=20, eval_every=20)
  _, _, m = cf_trainer.train_and_evaluate(config, tmp_path, pattern_dataset)
  assert m["test/hit@1"] > 0.15, m   # random: 0.05


def test_cold_user_metrics(pattern_dataset):
  """Stored cold users (3 items) are ranked among their 20 stored candidates."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from allmrec_jax.models import cf as cf_lib  # pylint: disable=g-import-not-at-top
  cold = np.array([[1, 2, 3], [10, 12, 14], [50, 51, 52]], np.int32)
  ds = dataclasses.replace(pattern_dataset, cold_user_items=cold)
  model = cf_lib.make_cf_model(dict(model="gru4rec", hidden_dim=8), ds.num_items)
  seq = np.zeros((1, 12), np.int32)
  params = model.init(jax.random.key(0), seq, seq, seq)["params"]
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  m = cf_trainer.cold_user_metrics(model, nn.unbox(params), ds, 12)
  assert m["test/cold_user/num_users"] == 3
  assert 0 <= m["test/cold_user/hit@1"] <= m["test/cold_user/hit@5"] <= 1
  assert cf_trainer.cold_user_metrics(model, nn.unbox(params), pattern_dataset, 12) == {}


@pytest.mark.parametrize("name", ["sasrec", "ncf"])
def test_grad_splits_is_the_same_objective(pattern_dataset, name):
  """config.cf.grad_splits: the M_i/M-weighted block gradients equal the whole-batch
  gradient (dropout off so the masks cannot differ), padding rows and padded positions
  included; a split that does not divide the batch is a named error."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from allmrec_jax import losses  # pylint: disable=g-import-not-at-top
  from allmrec_jax.data import pipelines  # pylint: disable=g-import-not-at-top
  config = tiny_config(name)
  config.cf.dropout = 0.0
  model = cf_trainer.make_model(config, pattern_dataset.num_items)
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.sgd(1.0)         # new params = params - gradient: compares the gradients
  params = cf_trainer.init_params(model, jax.random.key(0), config.data.maxlen)
  pipe = pipelines.cf_train_dataset(pattern_dataset, batch_size=16, maxlen=config.data.maxlen,
                                    seed=0, num_epochs=1, drop_remainder=False)
  batch = {k: jnp.asarray(pipe[0][k]) for k in ("seq", "pos", "neg", "mask")}
  batch["mask"] = batch["mask"].at[-5:].set(0.0)   # padding rows: an uneven M_i per block
  assert float((batch["pos"] == 0).mean()) > 0     # and padded positions
  out = []
  for n in (1, 4):
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    new, m = jax.jit(lambda s, b, n=n: cf_trainer.train_step(
        s, None, b, jax.random.key(1), model=model, tx=tx, loss_fn=losses.CF_LOSSES["bce"],
        grad_splits=n))(state, batch)
    out.append((new["params"], float(m["train/loss"])))
  np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out[1][0], out[0][0])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), out[0][0], params)
  assert max(jax.tree.leaves(moved)) > 1e-3          # the gradient is not trivially zero
  config.cf.grad_splits = 3
  with pytest.raises(ValueError, match="config.cf.grad_splits"):
    cf_trainer.grad_splits(config)


def test_checkpoint_cadence_apart_from_evaluation(tmp_path, pattern_dataset):
  """cf.ckpt_every bounds the epochs an interruption loses, independent of eval_every:
  killed after epoch 5 (validation every 3, checkpoints every 2), the run resumes at epoch
  4 and ends identical to the uninterrupted one, its metrics log without duplicates."""
  config = tiny_config("sasrec", num_epochs=6, eval_every=3)
  config.cf.ckpt_every = 2
  _, params_a, m_a = cf_trainer.train_and_evaluate(config, tmp_path / "a", pattern_dataset)
  wd = tmp_path / "b"
  cf_trainer.train_and_evaluate(config, wd, pattern_dataset, stop_after_epoch=5)
  steps = cf_trainer.checkpointing.make_manager(wd / "cf" / "ckpt", read_only=True).all_steps()
  assert sorted(steps) == [3, 4], steps    # epoch 2 rotated out; 5 is no checkpoint epoch
  _, params_b, m_b = cf_trainer.train_and_evaluate(config, wd, pattern_dataset)
  _assert_same_run(m_a, params_a, m_b, params_b)
  log = _jsonl(wd / "cf" / "metrics.jsonl")
  assert [r["epoch"] for r in log] == list(range(1, 7))
