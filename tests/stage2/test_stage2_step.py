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
