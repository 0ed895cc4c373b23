"""CF backbones: shapes, padding and causal masking, init, logical axes, torch parity."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax import common_types as ct
from allmrec_jax import sharding
from allmrec_jax.models import cf as cf_lib

N, D, L, B = 40, 16, 10, 3
MODELS = sorted(cf_lib.CF_MODELS)


def _model(name, **kw):
  cfg = dict(model=name, hidden_dim=D, maxlen=L, num_blocks=2, num_heads=2, dropout=0.3,
             conv_blocks=2, dilations=(1, 2))
  cfg.update(kw)
  return cf_lib.make_cf_model(cfg, N)


def _init(model, seed=0):
  seq = jnp.zeros((1, L), jnp.int32)
  boxed = model.init({"params": jax.random.key(seed), "dropout": jax.random.key(1)},
                     seq, seq, seq)
  return boxed, nn.unbox(boxed)


def _seqs():
  rng = np.random.default_rng(0)
  seq = rng.integers(1, N + 1, size=(B, L)).astype(np.int32)
  seq[0, :6] = 0   # short user
  seq[1, :2] = 0
  return jnp.asarray(seq)


@pytest.mark.parametrize("name", MODELS)
def test_surface_shapes(name):
  model = _model(name)
  _, p = _init(model)
  seq = _seqs()
  items = jnp.arange(1, 8, dtype=jnp.int32)[None].repeat(B, 0)
  assert model.apply(p, method="item_embeddings").shape == (N + 1, D)
  assert model.apply(p, seq, method="user_representation").shape == (B, D)
  assert model.apply(p, seq, items, method="score").shape == (B, 7)
  pl, nl = model.apply(p, seq, seq, seq)
  assert pl.shape == nl.shape == (B, L)
  # score == dot/NeuMF of the user representation with the items.
  user = model.apply(p, seq, method="user_representation")
  np.testing.assert_allclose(model.apply(p, seq, items, method="score"),
                             model.apply(p, user, items, method="score_users"), rtol=1e-6)
  # Full-catalogue scoring with a 1-D item vector.
  full = model.apply(p, user, jnp.arange(N + 1, dtype=jnp.int32), method="score_users")
  assert full.shape == (B, N + 1)
  np.testing.assert_allclose(full[:, 1:8], model.apply(p, seq, items, method="score"),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_padding_never_leaks(name):
  """Padding rows of every table can hold anything: real positions do not change."""
  model = _model(name)
  _, p = _init(model)
  seq = _seqs()
  before = model.apply(p, seq, method="encode")
  rng = np.random.default_rng(1)
  p2 = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[0].set(jnp.asarray(rng.normal(size=x.shape[1:]) * 5, x.dtype))
      if any(getattr(k, "key", "") in ("item_emb", "pos_emb", "user_item_emb") for k in path)
      else x, p)
  after = model.apply(p2, seq, method="encode")
  real = np.asarray(seq != 0)
  np.testing.assert_allclose(np.asarray(after)[real], np.asarray(before)[real], atol=1e-5)
  # A padded user's representation is also independent of the padding values.
  np.testing.assert_allclose(model.apply(p2, seq, method="user_representation"),
                             model.apply(p, seq, method="user_representation"), atol=1e-5)
  # And a fully padded row in the batch does not change the other rows.
  seq3 = seq.at[2].set(0)
  np.testing.assert_allclose(model.apply(p, seq3, method="encode")[:2], before[:2], atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_causal(name):
  """Changing items after position t leaves the states at positions <= t unchanged."""
  model = _model(name)
  _, p = _init(model)
  seq = _seqs()
  t = 6
  seq2 = seq.at[:, t + 1:].set((seq[:, t + 1:] % N) + 1)
  a = model.apply(p, seq, method="encode")
  b = model.apply(p, seq2, method="encode")
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_dropout_only_in_training(name):
  model = _model(name)
  _, p = _init(model)
  seq = _seqs()
  det1 = model.apply(p, seq, seq, seq, deterministic=True)
  det2 = model.apply(p, seq, seq, seq, deterministic=True)
  np.testing.assert_array_equal(det1[0], det2[0])
  tr1 = model.apply(p, seq, seq, seq, deterministic=False, rngs={"dropout": jax.random.key(3)})
  tr2 = model.apply(p, seq, seq, seq, deterministic=False, rngs={"dropout": jax.random.key(4)})
  assert not np.allclose(tr1[0], tr2[0])


@pytest.mark.parametrize("name", MODELS)
def test_item_table_init_and_axes(name):
  model = _model(name)
  boxed, p = _init(model)
  table = model.apply(p, method="item_embeddings")
  np.testing.assert_array_equal(table[0], 0.0)
  item = boxed["params"]["item_emb"]["embedding"]
  assert isinstance(item, nn.Partitioned) and item.names == (ct.ITEMS, ct.EMBED)
  # Every parameter carries logical names, and they map onto a (data, fsdp, tensor) mesh.
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  if jax.device_count() >= 8:
    mesh = sharding.make_mesh((2, 2, 2))
    seq = jnp.zeros((1, L), jnp.int32)
    params, _ = sharding.sharded_init(
        lambda k: model.init({"params": k, "dropout": k}, seq, seq, seq)["params"], mesh,
        None, jax.random.key(0))
    emb = params["item_emb"]["embedding"]
    assert sharding.num_shards(emb) == 2  # (items: replicated, embed: fsdp)


def test_xavier_normal_std():
  """torch xavier_normal_: std = sqrt(2 / (fan_in + fan_out)), not truncated; row 0 zero."""
  from allmrec_jax.models.cf import common  # pylint: disable=g-import-not-at-top
  table = np.asarray(common.padded_table_init()(jax.random.key(0), (3001, 64)))
  np.testing.assert_array_equal(table[0], 0.0)
  np.testing.assert_allclose(table[1:].std(), np.sqrt(2.0 / (3001 + 64)), rtol=0.02)
  assert np.abs(table).max() > 3.5 * table.std()  # not truncated at 2 std


def test_registry_and_errors():
  assert set(cf_lib.CF_MODELS) == {"sasrec", "ncf", "gru4rec", "nextitnet"}
  with pytest.raises(ValueError, match="config.cf.model"):
    cf_lib.make_cf_model(dict(model="bert4rec"), 10)
  with pytest.raises(ValueError, match="num_heads"):
    m = _model("sasrec", num_heads=3)
    _init(m)


@pytest.mark.parametrize("heads", [1, 2])   # 1: the default (no head axis), 2: multi-head
def test_sasrec_matches_torch_reference(heads):
  """Same weights in a torch SASRec written like pmixer's port -> same logits."""
  torch = pytest.importorskip("torch")
  model = _model("sasrec", num_heads=heads, dropout=0.0)
  _, p = _init(model)
  pr = jax.tree.map(lambda x: torch.tensor(np.asarray(x)), p["params"])
  seq = np.asarray(_seqs())
  pos = np.roll(seq, -1, axis=1)
  neg = (seq % N) + 1

  tl = torch.tensor(seq == 0)
  x = pr["item_emb"]["embedding"][torch.tensor(seq, dtype=torch.long)] * D ** 0.5
  poss = torch.arange(1, L + 1)[None].repeat(B, 1) * (~tl)
  x = x + pr["pos_emb"]["embedding"][poss]
  x = x * ~tl[..., None]
  mask = ~torch.tril(torch.ones((L, L), dtype=torch.bool))
  for i in range(2):
    a = pr[f"attn_{i}"]
    mha = torch.nn.MultiheadAttention(D, heads, dropout=0.0)
    with torch.no_grad():
      mha.in_proj_weight.copy_(a["in_proj_kernel"].T)
      mha.in_proj_bias.copy_(a["in_proj_bias"])
      mha.out_proj.weight.copy_(a["out_proj"]["kernel"].T)
      mha.out_proj.bias.copy_(a["out_proj"]["bias"])
    ln = lambda t, q: torch.nn.functional.layer_norm(t, (D,), q["scale"], q["bias"], 1e-8)
    xt = x.transpose(0, 1)
    q = ln(xt, pr[f"attn_ln_{i}"])
    out, _ = mha(q, xt, xt, attn_mask=mask)
    x = (q + out).transpose(0, 1)
    x = ln(x, pr[f"ffn_ln_{i}"])
    f = pr[f"ffn_{i}"]
    h = torch.relu(x @ f["conv1"]["kernel"] + f["conv1"]["bias"])
    x = (h @ f["conv2"]["kernel"] + f["conv2"]["bias"] + x) * ~tl[..., None]
  h = torch.nn.functional.layer_norm(x, (D,), pr["last_ln"]["scale"], pr["last_ln"]["bias"],
                                     1e-8)
  emb = pr["item_emb"]["embedding"]
  ref_pos = (h * emb[torch.tensor(pos, dtype=torch.long)]).sum(-1).detach().numpy()
  ref_neg = (h * emb[torch.tensor(neg, dtype=torch.long)]).sum(-1).detach().numpy()
  pl, nl = model.apply(p, jnp.asarray(seq), jnp.asarray(pos), jnp.asarray(neg))
  real = seq != 0
  np.testing.assert_allclose(np.asarray(pl)[real], ref_pos[real], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(nl)[real], ref_neg[real], rtol=1e-4, atol=1e-4)


def test_nextitnet_causal_conv_equals_dilated_conv():
  """The matmul form of the causal conv equals nn.Conv with dilation and left padding."""
  from allmrec_jax.models.cf.nextitnet import CausalConv  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 9, 5))
  conv = CausalConv(4, 3, 2)
  p = nn.unbox(conv.init(jax.random.key(1), x))["params"]
  ref = nn.Conv(4, (3,), kernel_dilation=(2,), padding=[(4, 0)]).apply({"params": p}, x)
  np.testing.assert_allclose(conv.apply({"params": p}, x), ref, atol=1e-5)
