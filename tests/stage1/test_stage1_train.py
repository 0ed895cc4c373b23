"""Stage-1 step and trainer: trainable tree, frozen CF, freeze_sbert, resume, metrics."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax.data import pipelines
from allmrec_jax.models import cf as cf_lib
from allmrec_jax.trainers import stage1
from allmrec_jax.trainers import steps
from allmrec_jax.weights import sbert as sbert_lib

import conftest  # tests/stage1/conftest.py helpers  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def setup(tiny_dataset, tiny_sbert_dir):
  config = conftest.make_config(tiny_sbert_dir, sbert_dropout=False)
  cfg = stage1.Stage1Config.from_config(config)
  cf_model, cf_params = conftest.make_cf(config, tiny_dataset.num_items)
  sb = sbert_lib.load_sbert(tiny_sbert_dir)
  table = stage1.cf_item_table(cf_model, cf_params)
  models = stage1.make_models(table.shape[-1], sb.module, cfg.latent_dim)
  ids, mask = stage1.item_text_table(tiny_dataset, sb.tokenizer, cfg.text_max_len)
  batch = pipelines.stage1_batch(tiny_dataset, np.arange(4), maxlen=cfg.maxlen, seed=0,
                                 epoch=0)
  batch = {"seq": batch["seq"], "pos": batch["pos"], "neg": batch["neg"],
           "mask": np.ones(4, np.float32)}
  frozen = {"cf": cf_params, "item_table": table, "text_ids": jnp.asarray(ids),
            "text_mask": jnp.asarray(mask)}
  return dict(config=config, cfg=cfg, cf_model=cf_model, cf_params=cf_params, sb=sb,
              models=models, ids=ids, mask=mask, batch=batch, frozen=frozen, table=table)


def _loss(s, trainable, frozen, cfg=None):
  fn = functools.partial(stage1.stage1_loss, models=s["models"], cf_model=s["cf_model"],
                         cfg=cfg or s["cfg"])
  return jax.jit(fn)(trainable, frozen, s["batch"], jax.random.key(0))


def test_item_text_table_is_tokenised_once_and_trimmed(setup, tiny_dataset):
  ids, mask = setup["ids"], setup["mask"]
  assert ids.shape[0] == tiny_dataset.num_items + 1 and ids.dtype == np.int32
  assert ids.shape[1] % 8 == 0 and ids.shape[1] <= setup["cfg"].text_max_len
  assert not mask[0].any()                      # padding item 0
  assert mask[1:].sum(1).min() >= 3             # [CLS] text [SEP]
  enc = setup["sb"].tokenizer(tiny_dataset.item_text(3))["input_ids"]
  np.testing.assert_array_equal(ids[3, :len(enc)], enc)


def _norms(tree):
  return {k: float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(v))))
          for k, v in tree.items()}


def test_gradients_reach_exactly_the_trainable_tree(setup):
  s = setup
  trainable = stage1.init_trainable(s["models"], jax.random.key(1), s["sb"].params, False)
  fn = functools.partial(stage1.stage1_loss, models=s["models"], cf_model=s["cf_model"],
                         cfg=s["cfg"])

  def per_term(t):
    _, terms = fn(t, s["frozen"], s["batch"], jax.random.key(0))
    return jnp.stack([terms[k] for k in stage1.LOSS_TERMS])

  jac = jax.jit(jax.jacrev(per_term))(trainable)   # leaves: [4, *param shape]
  assert set(jac) == {"item_ae", "text_ae", "sbert"}
  reach = {}
  for i, term in enumerate(stage1.LOSS_TERMS):
    norms = {k: _norms({"x": jax.tree.map(lambda g, i=i: g[i], v)})["x"] for k, v in jac.items()}
    reach[term] = {k for k, n in norms.items() if n > 0}
  assert reach["rec"] == {"item_ae"}
  assert reach["item_recon"] == {"item_ae"}
  assert reach["match"] == {"item_ae", "text_ae", "sbert"}
  # Text targets are stop-gradient: SBERT learns from text recon only through q.
  assert reach["text_recon"] == {"text_ae", "sbert"}
  dec = jax.tree.map(lambda g: g[1], jac["text_ae"]["decoder"])   # matching: no decoder
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(dec))


def test_step_updates_trainable_only_and_cf_is_unchanged(setup):
  s = setup
  trainable = stage1.init_trainable(s["models"], jax.random.key(1), s["sb"].params, False)
  before = jax.tree.map(np.array, trainable)
  cf_before = jax.tree.map(np.array, s["cf_params"])
  tx = stage1.make_optimizer(s["cfg"])
  opt_state = tx.init(trainable)
  # Optimizer state exists for the trainable leaves only (mu and nu of Adam).
  n_train = len(jax.tree.leaves(trainable))
  assert len(jax.tree.leaves(opt_state)) == 2 * n_train + 1
  step = stage1.make_train_step(s["models"], s["cf_model"], s["cfg"], tx, donate=False)
  state, m = step(steps.new_state(trainable, opt_state), s["frozen"], s["batch"],
                  jax.random.key(0))
  new = state["params"]
  assert int(state["step"]) == 1
  assert set(m) >= {"train/loss", "train/rec", "train/match", "train/item_recon",
                    "train/text_recon"}
  for name in ("item_ae", "text_ae"):
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), new[name],
                           before[name])
    assert all(jax.tree.leaves(changed)), name
  assert np.any(np.asarray(new["sbert"]["layer_0"]["query"]["kernel"])
                != before["sbert"]["layer_0"]["query"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, s["cf_params"]),
               cf_before)


def test_freeze_sbert_matches_finetuned_path_at_step0(setup):
  s = setup
  trainable = stage1.init_trainable(s["models"], jax.random.key(1), s["sb"].params, False)
  loss_ft, terms_ft = _loss(s, trainable, s["frozen"])
  q_table = stage1.sbert_embed_all(s["models"].sbert, s["sb"].params, s["ids"], s["mask"])
  frozen = {"cf": s["cf_params"], "item_table": s["table"], "text_table": q_table}
  cfg = stage1.Stage1Config(**{**s["cfg"].__dict__, "freeze_sbert": True})
  trainable_frozen = {k: v for k, v in trainable.items() if k != "sbert"}
  loss_fr, terms_fr = _loss(s, trainable_frozen, frozen, cfg)
  np.testing.assert_allclose(loss_fr, loss_ft, rtol=1e-5)
  for k in terms_ft:
    np.testing.assert_allclose(terms_fr[k], terms_ft[k], rtol=1e-5, atol=1e-7)
  # The packed-text batch (several titles per SBERT row) gives the same loss.
  rows = stage1.packing_rows(s["mask"], 4)
  packed = stage1.pack_batch_texts(s["batch"], s["ids"], s["mask"], rows)
  assert packed["packed_text"]["input_ids"].shape[0] < 8   # fewer rows than texts
  fn = functools.partial(stage1.stage1_loss, models=s["models"], cf_model=s["cf_model"],
                         cfg=s["cfg"])
  loss_pk, _ = jax.jit(fn)(trainable, s["frozen"], packed, jax.random.key(0))
  np.testing.assert_allclose(loss_pk, loss_ft, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(cf_lib.CF_MODELS))
def test_any_cf_backbone_can_be_aligned(setup, tiny_dataset, name):
  s = setup
  cf_model, cf_params = conftest.make_cf(s["config"], tiny_dataset.num_items, name)
  table = stage1.cf_item_table(cf_model, cf_params)
  models = stage1.make_models(table.shape[-1], s["models"].sbert, s["cfg"].latent_dim)
  q_table = stage1.sbert_embed_all(models.sbert, s["sb"].params, s["ids"], s["mask"])
  trainable = stage1.init_trainable(models, jax.random.key(1), None, True)
  frozen = {"cf": cf_params, "item_table": table, "text_table": q_table}
  loss_fn = functools.partial(stage1.stage1_loss, frozen=frozen, batch=s["batch"],
                              rng=jax.random.key(0), models=models, cf_model=cf_model,
                              cfg=s["cfg"])
  (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  assert np.isfinite(float(loss))
  assert float(jnp.abs(g["item_ae"]["encoder"]["kernel"]).max()) > 0


def test_joint_item_embeddings_cf_and_text(setup):
  s = setup
  params = stage1.init_trainable(s["models"], jax.random.key(1), s["sb"].params, False)
  e = stage1.joint_item_embeddings(s["models"], params, source="cf", item_table=s["table"])
  q = stage1.joint_item_embeddings(s["models"], params, source="text", text_ids=s["ids"],
                                   text_mask=s["mask"], batch_size=16)
  n1 = s["table"].shape[0]
  assert e.shape == (n1, s["cfg"].latent_dim) and q.shape == e.shape
  assert float(e.min()) > 0 and float(e.max()) < 1     # sigmoid outputs
  q_item5 = s["models"].text_ae.apply(
      {"params": params["text_ae"]},
      s["models"].sbert.apply({"params": s["sb"].params}, s["ids"][5:6], s["mask"][5:6])[0],
      method=s["models"].text_ae.encode)
  np.testing.assert_allclose(q[5], q_item5[0], atol=1e-6)


def test_text_to_item_recall_on_known_geometry():
  e = jnp.array([[0, 0], [0, 0], [1, 0], [0, 1], [1, 1]], jnp.float32)
  q = jnp.array([[9, 9], [0.1, 0], [0.1, 0.05], [0, 0.9], [0.2, 0.9]], jnp.float32)
  # item 1 -> nearest e_1 (rank 0); item 2 -> e_1 nearer (rank 1); item 3 -> rank 0;
  # item 4 (0.2, 0.9): e_3 (0,1) d=0.05 vs e_4 (1,1) d=0.65 -> rank 1.
  r = stage1.text_to_item_recall(q, e, ks=(1, 2))
  assert r["align/text2item_recall@1"] == 0.5
  assert r["align/text2item_recall@2"] == 1.0


def test_cold_items_bottom_fraction(tiny_dataset):
  cold = stage1.cold_items(tiny_dataset, 0.35)
  assert not cold[0] and cold.sum() == int(np.floor(0.35 * tiny_dataset.num_items))
  counts = tiny_dataset.item_counts
  assert counts[cold].max() <= counts[1:][~cold[1:]].min()


def _run(config, workdir, ds, cf_model, cf_params):
  return stage1.train_and_evaluate(config, workdir, ds, cf_model, cf_params)


def test_train_and_evaluate_resume_equals_uninterrupted(setup, tiny_dataset, tmp_path):
  s = setup
  common = dict(freeze_sbert=True, checkpoint_every=2, num_epochs=3)
  cfg_full = conftest.make_config(s["config"].sbert.path, max_steps=6, **common)
  cfg_half = conftest.make_config(s["config"].sbert.path, max_steps=3, **common)
  full = _run(cfg_full, tmp_path / "a", tiny_dataset, s["cf_model"], s["cf_params"])
  _run(cfg_half, tmp_path / "b", tiny_dataset, s["cf_model"], s["cf_params"])
  resumed = _run(cfg_full, tmp_path / "b", tiny_dataset, s["cf_model"], s["cf_params"])
  pa = stage1.load_trained_stage1(cfg_full, tmp_path / "a").params
  pb = stage1.load_trained_stage1(cfg_full, tmp_path / "b").params
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), pa, pb)
  for k in ("align/text2item_recall@10", "all/hit@1_text", "all/hit@1_cf"):
    assert full[k] == resumed[k]
  lines = [json.loads(x) for x in (tmp_path / "b/stage1/metrics.jsonl").read_text()
           .splitlines()]
  assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
  a_lines = [json.loads(x) for x in (tmp_path / "a/stage1/metrics.jsonl").read_text()
             .splitlines()]
  np.testing.assert_allclose([x["train/loss"] for x in lines],
                             [x["train/loss"] for x in a_lines], rtol=1e-6)
  stored = json.loads((tmp_path / "a/stage1/metrics.json").read_text())
  for key in ("align/text2item_recall@1", "align/text2item_recall@10", "cold/hit@1_text",
              "cold/hit@1_cf"):
    assert key in stored
  assert json.loads((tmp_path / "a/stage1/FINISHED").read_text())["steps"] == 6
  assert any((tmp_path / "a/stage1/tb").iterdir())
  # A finished run is not retrained.
  again = _run(cfg_full, tmp_path / "a", tiny_dataset, s["cf_model"], s["cf_params"])
  assert again["train/steps"] == 6 and again == json.loads(json.dumps(full))


def test_cold_items_are_the_scenarios_definition(tiny_dataset):
  from allmrec_jax.data import scenarios  # pylint: disable=g-import-not-at-top
  for fraction in (0.2, 0.35, 0.5):
    cold, _ = scenarios.cold_warm_items(tiny_dataset, fraction)
    np.testing.assert_array_equal(np.flatnonzero(stage1.cold_items(tiny_dataset, fraction)),
                                  cold)


def test_config_sbert_normalize_is_honoured(setup):
  ids, mask = setup["ids"][1:9], setup["mask"][1:9]
  by_setting = {}
  for setting in ("auto", "false", "true"):
    config = conftest.make_config(setup["config"].sbert.path)
    config.sbert.normalize = setting
    sb = stage1._load_sbert(config)  # pylint: disable=protected-access
    by_setting[setting] = (sb.module.config.normalize,
                           np.asarray(sb.module.apply({"params": sb.params}, ids, mask)[0]))
  # The tiny model copies MiniLM's modules.json, which ends with a Normalize module.
  assert [v[0] for v in by_setting.values()] == [True, False, True]
  raw = by_setting["false"][1]
  norms = np.linalg.norm(raw, axis=-1)
  assert (np.abs(norms - 1) > 0.1).all()
  np.testing.assert_allclose(by_setting["auto"][1], raw / norms[:, None], atol=1e-6)
  config = conftest.make_config(setup["config"].sbert.path)
  config.sbert.normalize = "sometimes"
  with pytest.raises(ValueError, match="config.sbert.normalize"):
    stage1._load_sbert(config)  # pylint: disable=protected-access


def test_text_stats_are_per_dimension_over_real_items():
  table = jnp.array([[100., 100.], [1., 2.], [3., 2.], [5., 2.]])
  stats = stage1.text_stats(table, eps=1e-3)
  np.testing.assert_allclose(stats["mean"], [3., 2.])
  np.testing.assert_allclose(stats["scale"], [np.sqrt(8 / 3), 1e-3], rtol=1e-6)
  np.testing.assert_allclose(stage1.standardize_text(table[1:], stats)[:, 0],
                             np.array([-2., 0., 2.]) / np.sqrt(8 / 3), rtol=1e-6)
  assert stage1.standardize_text(table, None) is table


def test_text_standardize_feeds_standardised_sbert_output(setup, tiny_dataset, tmp_path):
  s = setup
  sb, models = s["sb"], s["models"]
  q = stage1.sbert_embed_all(sb.module, sb.params, s["ids"], s["mask"])
  stats = stage1.text_stats(q)
  q_std = (q - stats["mean"]) / stats["scale"]
  np.testing.assert_allclose(jnp.mean(q_std[1:], 0), 0, atol=1e-4)
  np.testing.assert_allclose(jnp.std(q_std[1:], 0), 1, atol=1e-3)
  trainable = stage1.init_trainable(models, jax.random.key(1), sb.params, freeze_sbert=False)
  base = {"cf": s["cf_params"], "item_table": s["table"]}
  # Fine-tuned path + stats == frozen path fed the standardised table by hand.
  tot_ft, terms_ft = _loss(s, trainable, {**s["frozen"], "text_stats": stats})
  no_sbert = {k: v for k, v in trainable.items() if k != "sbert"}
  tot_fz, terms_fz = _loss(s, no_sbert, {**base, "text_table": q_std})
  np.testing.assert_allclose(tot_ft, tot_fz, rtol=2e-5)
  np.testing.assert_allclose(terms_ft["text_recon"], terms_fz["text_recon"], rtol=2e-5)
  tot_plain, _ = _loss(s, no_sbert, {**base, "text_table": q})
  assert abs(float(tot_plain) - float(tot_fz)) > 1e-3   # the option changes the loss
  # Trainer: stats stored with the run, restored for stage 2, applied to the text path.
  config = conftest.make_config(s["config"].sbert.path, freeze_sbert=True, max_steps=2,
                                text_standardize=True)
  stage1.train_and_evaluate(config, tmp_path, tiny_dataset, s["cf_model"], s["cf_params"])
  res = stage1.load_trained_stage1(config, tmp_path)
  for k in ("mean", "scale"):
    np.testing.assert_allclose(res.params["text_stats"][k], stats[k], rtol=1e-5, atol=1e-6)
  got = stage1.joint_item_embeddings(res.models, res.params, source="text",
                                     text_ids=s["ids"], text_mask=s["mask"])
  want = models.text_ae.apply({"params": res.params["text_ae"]}, q_std,
                              method=models.text_ae.encode)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_packing_rows_buckets():
  """Buckets: first ~5% above the mean batch (multiple of 4), then +25%, then doubling, up
  to 2B rows; every batch of 2B texts fits the last one."""
  mask = np.zeros((1350, 32), np.int32)
  mask[1:, :6] = 1                                  # mean 6 tokens per text
  rows = stage1.packing_rows(mask, 60)
  assert rows == (24, 32, 64, 120)                  # 1.05 * 120 * 6 / 32 = 23.6 -> 24
  assert all(r % 4 == 0 for r in rows) and list(rows) == sorted(rows)
  assert stage1.packing_rows(np.ones((3, 8), np.int32), 2) == (4,)   # already 2B
  # A batch of the longest texts still fits the last bucket.
  ids = np.arange(1, 1 + 120 * 32, dtype=np.int32).reshape(120, 32)
  batch = {"pos": np.arange(60), "neg": np.arange(60, 120)}
  full = np.ones((120, 32), np.int32)
  packed = stage1.pack_batch_texts(batch, ids, full, rows)["packed_text"]
  assert packed["input_ids"].shape == (120, 32)


def test_compact_vocab_step_equals_dense_adam(setup):
  """stage1.compact_vocab: Adam over the used word-embedding rows gives the same trainable
  tree as dense Adam over the whole table, for packed and unpacked batches; the rows no
  item text uses never move."""
  s = setup
  tx = stage1.make_optimizer(s["cfg"])
  vocab = stage1.compact_vocab(s["ids"], s["models"].sbert)
  assert vocab.rows.shape[0] < s["models"].sbert.config.vocab_size
  rows = stage1.packing_rows(s["mask"], 4)
  packed = stage1.pack_batch_texts(s["batch"], s["ids"], s["mask"], rows)
  results = []
  for v in (None, vocab):
    trainable = stage1.init_trainable(s["models"], jax.random.key(1), s["sb"].params, False)
    opt_state = stage1.init_opt_state(tx, trainable, v)
    step = stage1.make_train_step(s["models"], s["cf_model"], s["cfg"], tx, donate=False,
                                  vocab=v)
    state = steps.new_state(trainable, opt_state)
    for i, b in enumerate((s["batch"], packed, s["batch"])):
      state, m = step(state, s["frozen"], b, jax.random.key(i))
    results.append((jax.tree.map(np.asarray, state["params"]), float(m["train/grad_norm"])))
  (dense, gn_dense), (compact, gn_compact) = results
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
               compact, dense)
  np.testing.assert_allclose(gn_compact, gn_dense, rtol=1e-5)
  word0 = np.asarray(s["sb"].params["word"]["embedding"])
  unused = np.setdiff1d(np.arange(word0.shape[0]), np.asarray(vocab.rows))
  np.testing.assert_array_equal(compact["sbert"]["word"]["embedding"][unused], word0[unused])
  np.testing.assert_array_equal(dense["sbert"]["word"]["embedding"][unused], word0[unused])
  used = np.asarray(vocab.rows)
  assert np.any(compact["sbert"]["word"]["embedding"][used] != word0[used])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_data_parallel_mesh_equals_one_device(setup, tiny_dataset, tmp_path):
  """Stage 1 on an 8-way data mesh (batches split, state replicated) trains the same
  parameters as one device computing the whole step, float32 reduction order aside."""
  s = setup
  out = {}
  for name, shape in (("one", (1, 1, 1)), ("mesh", (8, 1, 1))):
    config = conftest.make_config(s["config"].sbert.path, max_steps=3, batch_size=8)
    config.mesh.shape = shape            # SBERT fine-tuned on packed texts, 8 users a step
    stage1.train_and_evaluate(config, tmp_path / name, tiny_dataset, s["cf_model"],
                              s["cf_params"])
    out[name] = stage1.load_trained_stage1(config, tmp_path / name).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=2e-4, atol=2e-5),
               out["mesh"], out["one"])
