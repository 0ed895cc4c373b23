"""Stage-2 step: loss vs a direct computation, gradients only for the projectors,
frozen LLM unchanged, and the same loss on 8 fake devices under several meshes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from allmrec_jax import sharding
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.models.llm import LlamaConfig, LlamaDecoder
from allmrec_jax.trainers import stage2

V, E, D, K, N = 96, 32, 8, 16, 40


def tiny_llm():
  cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  module = LlamaDecoder(cfg)
  params = module.init(jax.random.PRNGKey(1), input_ids=jnp.zeros((1, 4), jnp.int32))
  return module, jax.tree.map(jnp.asarray, __import__("flax").linen.unbox(params))


def make_batch(rng, b=8, length=24, slots=5, tt=4):
  ids = rng.integers(1, V, (b, length)).astype(np.int32)
  n_real = rng.integers(length - 6, length + 1, b)
  mask = (np.arange(length)[None] < n_real[:, None]).astype(np.int32)
  item_pos = np.stack([rng.choice(np.arange(1, length - 8), slots, replace=False)
                       for _ in range(b)]).astype(np.int32)
  item_pos[0, -1] = length                       # an unused slot
  tpos = (n_real[:, None] - tt - 1 + np.arange(tt)[None]).astype(np.int32)
  tmask = np.ones((b, tt), np.float32)
  tmask[1, -1] = 0
  return {"input_ids": ids, "attention_mask": mask, "user_pos": np.zeros(b, np.int32),
          "item_pos": item_pos, "item_ids": rng.integers(1, N, (b, slots)).astype(np.int32),
          "target_pos": tpos, "target_ids": np.take_along_axis(ids, tpos + 1, 1),
          "target_mask": tmask, "prompt_len": tpos[:, 0] + 1,
          "user_rep": rng.normal(size=(b, D)).astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
  llm, llm_params = tiny_llm()
  proj = projectors_lib.Stage2Projectors(K, D, E)
  pp = stage2.init_projectors(proj, jax.random.PRNGKey(2), K, D)
  rng = np.random.default_rng(0)
  table = rng.normal(size=(N, K)).astype(np.float32)
  return llm, llm_params, proj, pp, table, make_batch(rng)


def reference_loss(llm, llm_params, proj, pp, table, batch):
  """Full-vocabulary logits at every position, then the masked token mean (HF style)."""
  emb = np.array(llm.apply(llm_params, batch["input_ids"], method=llm.embed))
  items = np.asarray(proj.apply(pp, table[batch["item_ids"]], method=proj.item))
  user = np.asarray(proj.apply(pp, batch["user_rep"], method=proj.user))
  for b in range(emb.shape[0]):
    for s, p in enumerate(batch["item_pos"][b]):
      if p < emb.shape[1]:
        emb[b, p] = items[b, s]
    emb[b, batch["user_pos"][b]] = user[b]
  logits, _ = llm.apply(llm_params, inputs_embeds=jnp.asarray(emb),
                        attention_mask=batch["attention_mask"])
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  total, count = 0.0, 0.0
  for b in range(emb.shape[0]):
    for j in range(batch["target_pos"].shape[1]):
      if batch["target_mask"][b, j]:
        total -= float(logp[b, batch["target_pos"][b, j], batch["target_ids"][b, j]])
        count += 1
  return total / count


def test_loss_matches_reference(setup):
  llm, llm_params, proj, pp, table, batch = setup
  loss, aux = stage2.lm_loss(pp, llm_params, jnp.asarray(table), batch, llm=llm,
                             projectors=proj)
  assert float(aux["tokens"]) == batch["target_mask"].sum()
  np.testing.assert_allclose(float(loss), reference_loss(llm, llm_params, proj, pp, table,
                                                         batch), rtol=1e-5)


def test_gradients_only_for_projectors_and_llm_frozen(setup):
  llm, llm_params, proj, pp, table, batch = setup
  before = jax.tree.map(np.array, llm_params)
  opt = optax.adam(1e-3, b1=0.9, b2=0.98)
  trainer = stage2.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj,
                                 item_table=table, optimizer=opt)
  state = trainer.init_state(pp)
  assert set(state["params"]["params"]) == {"user_proj", "item_proj"}
  losses = []
  for _ in range(3):
    state, m = trainer.step(state, batch)
    losses.append(float(m["train/loss"]))
  assert losses[-1] < losses[0]
  # every projector leaf moved; the LLM is bit-identical
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       state["params"], pp)
  assert all(jax.tree.leaves(moved))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, llm_params))
  # the optimizer state only covers the projectors
  n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
  n_proj = sum(x.size for x in jax.tree.leaves(pp))
  assert n_opt == 2 * n_proj + 1


def test_disabled_soft_tokens_change_the_loss(setup):
  llm, llm_params, proj, pp, table, batch = setup
  f = functools.partial(stage2.lm_loss, pp, llm_params, jnp.asarray(table), batch, llm=llm,
                        projectors=proj)
  full = float(f()[0])
  assert abs(float(f(use_user=False)[0]) - full) > 1e-6
  assert abs(float(f(use_items=False)[0]) - full) > 1e-6


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_step_matches_one_device(setup, shape):
  if len(jax.devices()) < 8:
    pytest.skip("needs --xla_force_host_platform_device_count=8")
  llm, llm_params, proj, pp, table, batch = setup
  opt = optax.adam(1e-3, b1=0.9, b2=0.98)
  one = stage2.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj,
                             item_table=table, optimizer=opt)
  s1 = one.init_state(pp)
  mesh = sharding.make_mesh(shape)
  abstract = jax.eval_shape(lambda: llm.init(jax.random.PRNGKey(1),
                                             input_ids=jnp.zeros((1, 4), jnp.int32)))
  shardings = sharding.logical_shardings(abstract, mesh)
  sharded_llm = jax.tree.map(jax.device_put, llm_params, shardings)
  many = stage2.Stage2Trainer(llm=llm, llm_params=sharded_llm, projectors=proj,
                              item_table=table, optimizer=opt, mesh=mesh)
  s8 = many.init_state(pp)
  for _ in range(2):
    s1, m1 = one.step(s1, batch)
    s8, m8 = many.step(s8, batch)
    np.testing.assert_allclose(float(m8["train/loss"]), float(m1["train/loss"]), atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=1e-5),
               s8["params"], s1["params"])
  if shape[2] > 1:   # tensor-parallel meshes really split the LLM
    assert max(sharding.num_shards(x) for x in jax.tree.leaves(sharded_llm)) > 1


def test_item_standardize_is_an_affine_reparametrisation_of_f_i():
  """stage2.item_standardize: columns of items 1..N at mean 0 / std 1, padding row 0 zero,
  and F_I on the standardised table equals F_I on the raw table once its first Linear
  absorbs the affine map (same function class as the paper)."""
  from allmrec_jax.trainers import item_tables  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  raw = np.zeros((N + 1, K), np.float32)
  raw[1:] = 0.5 + 0.03 * rng.standard_normal((N, K))      # a narrow band of sigmoid codes
  raw[1:, 3] = 0.7                                          # a constant column stays finite
  std = item_tables.item_table_for("joint", {"joint": raw}, seed=0, standardize=True)
  np.testing.assert_array_equal(std[0], 0.0)
  np.testing.assert_allclose(std[1:, :3].mean(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(std[1:, :3].std(0), 1.0, atol=1e-5)
  np.testing.assert_array_equal(std[1:, 3], 0.0)
  np.testing.assert_array_equal(
      item_tables.item_table_for("joint", {"joint": raw}, seed=0), raw)   # off: untouched
  f_i = projectors_lib.ItemProjector(K, E)
  params = f_i.init(jax.random.PRNGKey(0), jnp.zeros((1, K)))["params"]
  params = jax.tree.map(jnp.asarray, __import__("flax").linen.unbox(params))
  rows = raw[1:].astype(np.float64)
  mu, sd = rows.mean(0), rows.std(0)
  mu[3], sd[3] = 0.7, np.inf          # the constant column: weight 0 in the folded Linear
  w, b = np.asarray(params["fc1"]["kernel"]), np.asarray(params["fc1"]["bias"])
  folded = jax.tree.map(lambda x: x, params)
  folded["fc1"] = {"kernel": jnp.asarray(w / sd[:, None], jnp.float32),
                   "bias": jnp.asarray(b - (mu / sd) @ w, jnp.float32)}
  np.testing.assert_allclose(f_i.apply({"params": params}, jnp.asarray(std[1:])),
                             f_i.apply({"params": folded}, jnp.asarray(raw[1:])),
                             rtol=1e-4, atol=1e-4)


def test_user_match_loss_golden_and_step(setup):
  """stage2.user_match_weight: the InfoNCE against a numpy computation, and a step whose
  objective includes it lowers it while train/loss stays the LM loss."""
  llm, llm_params, proj, pp, table, batch = setup
  rng = np.random.default_rng(5)
  b = batch["input_ids"].shape[0]
  cands = np.stack([rng.choice(np.arange(1, N), 4, replace=False) for _ in range(b)])
  batch = dict(batch, cand_items=cands.astype(np.int32),
               target_item=cands[np.arange(b), rng.integers(0, 4, b)].astype(np.int32))
  got = float(stage2.user_match_loss(pp, jnp.asarray(table), batch, projectors=proj,
                                     temperature=0.5))
  u = np.asarray(proj.apply(pp, batch["user_rep"], method=proj.user), np.float64)
  c = np.asarray(proj.apply(pp, table[cands], method=proj.item), np.float64)
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  c /= np.linalg.norm(c, axis=-1, keepdims=True)
  logits = np.einsum("be,bce->bc", u, c) / 0.5
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.mean(logp[cands == batch["target_item"][:, None]])
  np.testing.assert_allclose(got, want, rtol=1e-5)

  opt = optax.adam(1e-2, b1=0.9, b2=0.98)
  trainer = stage2.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj,
                                 item_table=table, optimizer=opt, match_weight=1.0,
                                 match_temperature=0.5)
  state = trainer.init_state(pp)
  lm_only, _ = stage2.lm_loss(pp, llm_params, jnp.asarray(table), batch, llm=llm,
                              projectors=proj)
  match = []
  for i in range(5):
    state, m = trainer.step(state, batch)
    if i == 0:
      np.testing.assert_allclose(float(m["train/loss"]), float(lm_only), rtol=1e-5)
      np.testing.assert_allclose(float(m["train/match_loss"]), want, rtol=1e-5)
    match.append(float(m["train/match_loss"]))
  assert match[-1] < match[0]
  with pytest.raises(ValueError, match="user_match_weight"):
    stage2.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj, item_table=table,
                         optimizer=opt, match_weight=1.0, use_user=False)


def test_user_match_loss_catalog_negatives(setup):
  """user_match_negatives="catalog": a full softmax over every item (rows 1..N, the padding
  row 0 excluded) against a numpy computation; a trainer step with it lowers it."""
  llm, llm_params, proj, pp, table, batch = setup
  rng = np.random.default_rng(6)
  b = batch["input_ids"].shape[0]
  target = rng.integers(1, table.shape[0], b).astype(np.int32)
  batch = dict(batch, target_item=target,
               cand_items=np.stack([np.arange(1, 5)] * b).astype(np.int32))
  got = float(stage2.user_match_loss(pp, jnp.asarray(table), batch, projectors=proj,
                                     temperature=0.2, negatives="catalog"))
  u = np.asarray(proj.apply(pp, batch["user_rep"], method=proj.user), np.float64)
  c = np.asarray(proj.apply(pp, table[1:], method=proj.item), np.float64)
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  c /= np.linalg.norm(c, axis=-1, keepdims=True)
  logits = u @ c.T / 0.2
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(got, -np.mean(logp[np.arange(b), target - 1]), rtol=1e-5)
  with pytest.raises(ValueError, match="user_match_negatives"):
    stage2.user_match_loss(pp, jnp.asarray(table), batch, projectors=proj, temperature=0.2,
                           negatives="batch")
  # user_match_batch: extra (x_u, target) rows join the softmax's examples.
  extra_rep = rng.standard_normal((3, batch["user_rep"].shape[1])).astype(np.float32)
  extra_t = rng.integers(1, table.shape[0], 3).astype(np.int32)
  with_extra = float(stage2.user_match_loss(
      pp, jnp.asarray(table), dict(batch, match_user_rep=extra_rep, match_target=extra_t),
      projectors=proj, temperature=0.2, negatives="catalog"))
  ue = np.asarray(proj.apply(pp, extra_rep, method=proj.user), np.float64)
  ue /= np.linalg.norm(ue, axis=-1, keepdims=True)
  le = ue @ c.T / 0.2
  lpe = le - np.log(np.exp(le).sum(-1, keepdims=True))
  want = -np.mean(np.concatenate([logp[np.arange(b), target - 1],
                                  lpe[np.arange(3), extra_t - 1]]))
  np.testing.assert_allclose(with_extra, want, rtol=1e-5)
  trainer = stage2.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj,
                                 item_table=table, optimizer=optax.adam(1e-2),
                                 match_weight=1.0, match_temperature=0.2,
                                 match_negatives="catalog")
  state = trainer.init_state(pp)
  first = last = None
  for i in range(5):
    state, m = trainer.step(state, batch)
    last = float(m["train/match_loss"])
    first = last if i == 0 else first
  np.testing.assert_allclose(first, got, rtol=1e-5)
  assert last < first
