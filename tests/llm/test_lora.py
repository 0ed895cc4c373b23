"""LoRA adapters (models/lora.py, layers/linears.DenseGeneral): a fresh adapter leaves the
decoder unchanged, a trained one equals the merged kernel W + (alpha / r) A B (LoRA's
defining identity, against the plain decoder, itself tested against transformers), the
adapters get gradients, and on 8 fake devices they are laid out like their base kernels."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax import sharding as shd
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models.llm import LlamaConfig, LlamaDecoder, OPTConfig, OPTDecoder
from allmrec_jax.trainers import stage2
from configs import base

RANK, ALPHA = 4, 8.0


def _decoder(kind, targets, **kw):
  if kind == "llama":
    c = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=4, lora_rank=RANK,
                    lora_alpha=ALPHA, lora_targets=targets, **kw)
    m = LlamaDecoder(c)
  else:
    c = OPTConfig(vocab_size=40, hidden_size=16, ffn_dim=24, num_layers=2, num_heads=4,
                  max_position_embeddings=32, lora_rank=RANK, lora_alpha=ALPHA,
                  lora_targets=targets, **kw)
    m = OPTDecoder(c)
  params = nn.unbox(m.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 4), jnp.int32)))
  return m, {"params": params["params"]}


def _randomise(lora, seed):
  leaves, tree = jax.tree.flatten(nn.unbox(lora))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in
                                   zip(keys, leaves)])


def _merged(params, lora, scale):
  """The plain decoder's params with each adapted kernel W + scale * A B."""
  out = jax.tree.map(lambda x: x, params)
  for layer, blocks in lora.items():
    for block, mods in blocks.items():          # "attn" and / or "mlp"
      for proj, ab in mods.items():
        k = out["params"][layer][block][proj]["kernel"]
        a, b = ab["a"], ab["b"]
        nc = a.ndim - 1
        delta = (a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)).reshape(
            a.shape[:nc] + b.shape[1:])
        out["params"][layer][block][proj]["kernel"] = k + scale * delta
  return out


@pytest.mark.parametrize("kind,targets", [("llama", ("q", "v")), ("llama", ("k", "o")),
                                          ("opt", ("q", "v", "o")),
                                          ("llama", ("gate", "up", "down")),
                                          ("llama", ("q", "v", "down")),
                                          ("opt", ("fc1", "fc2")), ("opt", ("k", "fc2"))])
def test_adapter_is_the_merged_kernel(kind, targets):
  m, params = _decoder(kind, targets)
  lora = lora_lib.init_adapters(m, params, jax.random.PRNGKey(1))
  names = {p for blocks in lora.values() for mods in blocks.values() for p in mods}
  assert names == set(targets) and len(lora) == 2
  ids = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, 40)
  plain, _ = m.apply(params, input_ids=ids)
  fresh, _ = m.apply({**params, "lora": lora}, input_ids=ids)
  np.testing.assert_array_equal(np.asarray(fresh), np.asarray(plain))   # B = 0
  trained = _randomise(lora, 3)
  with_lora, _ = m.apply({**params, "lora": trained}, input_ids=ids)
  merged, _ = m.apply(_merged(params, trained, ALPHA / RANK), input_ids=ids)
  assert np.abs(np.asarray(with_lora) - np.asarray(plain)).max() > 1e-2
  np.testing.assert_allclose(np.asarray(with_lora), np.asarray(merged), atol=2e-5, rtol=1e-5)


def test_adapter_on_bfloat16_operands_and_remat():
  """The bfloat16-operand matmul path and rematerialised layers read the adapters too."""
  m, params = _decoder("llama", ("q", "v"), matmul_dtype="bfloat16", remat=True)
  trained = _randomise(lora_lib.init_adapters(m, params, jax.random.PRNGKey(1)), 3)
  ids = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, 40)
  with_lora, _ = m.apply({**params, "lora": trained}, input_ids=ids)
  merged, _ = m.apply(_merged(params, trained, ALPHA / RANK), input_ids=ids)
  plain, _ = m.apply(params, input_ids=ids)
  err = np.abs(np.asarray(with_lora) - np.asarray(merged)).max()
  moved = np.abs(np.asarray(with_lora) - np.asarray(plain)).max()
  assert err < 0.05 * moved, (err, moved)


def test_gradients_reach_the_adapters():
  m, params = _decoder("llama", ("q", "v"))
  lora = nn.unbox(lora_lib.init_adapters(m, params, jax.random.PRNGKey(1)))
  emb = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 16))

  def loss(lr):
    logits, _ = m.apply({**params, "lora": lr}, inputs_embeds=emb)
    return jnp.mean(logits ** 2)

  g = jax.grad(loss)(lora)
  for layer in g.values():
    for ab in layer["attn"].values():
      assert np.abs(np.asarray(ab["b"])).max() > 0      # B gets the signal first
      np.testing.assert_array_equal(np.asarray(ab["a"]), 0)  # dL/dA = 0 while B = 0


def test_frozen_decoder_without_targets_refuses_adapters():
  m, params = _decoder("llama", ())
  with pytest.raises(ValueError, match="lora_rank"):
    lora_lib.init_adapters(m, params, jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="llm.lora_targets"):
    lora_lib.parse_targets("q,x")
  assert lora_lib.parse_targets(" q, v ") == ("q", "v")


@pytest.mark.parametrize("kind,bad", [("llama", "fc1"), ("opt", "gate"), ("opt", "x")])
def test_mlp_targets_of_another_family_are_refused(kind, bad):
  """gate / up / down name the Llama family's MLP, fc1 / fc2 OPT's: a name the loaded
  family does not have is a one-line error naming the field, not a silently frozen layer."""
  assert lora_lib.parse_targets("q,gate,up,down,fc1,fc2") == (
      "q", "gate", "up", "down", "fc1", "fc2")          # before loading: any family's names
  want = rf"llm\.lora_targets='q,{bad}'.*\['{bad}'\] of a {kind} decoder"
  with pytest.raises(ValueError, match=want):
    _decoder(kind, ("q", bad))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_adapters_sharded_like_their_kernels():
  m, params = _decoder("llama", ("q", "v"))
  boxed = lora_lib.init_adapters(m, params, jax.random.PRNGKey(1))
  mesh = shd.make_mesh((1, 2, 4))     # data, fsdp, tensor
  trainer = stage2.Stage2Trainer(llm=m, llm_params=params, projectors=None,
                                 item_table=np.zeros((2, 2), np.float32),
                                 optimizer=stage2.make_optimizer(
                                     base.get_base_config().stage2),
                                 mesh=mesh)
  state = trainer.init_state({"params": {"w": np.ones((3,), np.float32)}, "lora": boxed})
  q = state["params"]["lora"]["layers_0"]["attn"]["q"]
  assert q["a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)   # embed, rank
  assert q["b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)  # heads
  assert state["params"]["params"]["w"].sharding.is_fully_replicated
  mu = state["opt_state"][0].mu["lora"]["layers_0"]["attn"]["q"]["b"]
  assert mu.sharding.spec == q["b"].sharding.spec
