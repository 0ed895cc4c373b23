"""NCF / NeuMF (He et al., WWW 2017) with a sequence-pooled user vector.

The published NCF indexes a user table by user id, which cannot represent a user unseen in
training (the cold-user scenario) and has no sequence input. Here the user vector is
pooled from the user's items instead (an item-based user embedding, as in FISM):
  p_t = mean_{j <= t, seq_j != 0} P[seq_j]            (causal running mean over the prefix)
  GMF:  g = p_t * Q_i
  MLP:  z = MLP([p_t ; Q_i])   (2D -> D -> D/2 ..., ReLU, dropout)
  NeuMF score s(t, i) = w . [g ; z] + b
`item_embeddings()` is Q (the GMF/MLP item table), `user_representation` is p at the last
position. Trained like the others: BCE with one sampled negative per position (NCF's log
loss with sampled negatives).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.models.cf import common

Array = ct.Array


class NCF(common.CFSurface):
  """Neural collaborative filtering (NeuMF head over GMF + MLP towers)."""

  def setup(self):
    c = self.config
    d = c.hidden_dim
    self.user_item_emb = common.item_embed(c.num_items, d, name="user_item_emb")  # P
    self.item_emb = common.item_embed(c.num_items, d, name="item_emb")            # Q
    dims = [max(d // (2 ** i), 1) for i in range(c.mlp_layers)]
    fan_ins = [2 * d] + dims[:-1]
    self.mlp = [common.dense(o, f, ct.EMBED if i == 0 else ct.MLP, ct.MLP if i == 0 else None,
                             name=f"mlp_{i}")
                for i, (o, f) in enumerate(zip(dims, fan_ins))]
    self.mlp_dropout = nn.Dropout(c.dropout)
    self.emb_dropout = nn.Dropout(c.dropout)
    self.predict = common.dense(1, d + dims[-1], ct.EMBED, None, name="predict")  # [g ; z] -> 1

  def item_table(self) -> Array:
    return self.item_emb.embedding

  def encode(self, seq: Array, deterministic: bool = True) -> Array:
    """float[B, L, D]: running mean of P over each prefix's real items (0 before any)."""
    mask = common.timeline_mask(seq)
    x = self.user_item_emb(seq) * mask
    x = self.emb_dropout(x, deterministic=deterministic)
    counts = jnp.maximum(jnp.cumsum(mask, axis=1), 1.0)
    return jnp.cumsum(x, axis=1) / counts

  def score_states(self, states: Array, items: Array) -> Array:
    """NeuMF scores float[...] of items int32[...] for user vectors float[..., D]."""
    q = jnp.take(self.item_table(), items, axis=0)
    shape = jnp.broadcast_shapes(states.shape, q.shape)
    states, q = jnp.broadcast_to(states, shape), jnp.broadcast_to(q, shape)
    z = jnp.concatenate([states, q], axis=-1)
    # Dropout is deterministic here: score_states has no `deterministic` flag and the
    # embedding dropout in `encode` already regularises.
    for layer in self.mlp:
      z = nn.relu(layer(z))
    return self.predict(jnp.concatenate([states * q, z], axis=-1))[..., 0]
