"""GRU4Rec (Hidasi et al., ICLR 2016) over left-padded sequences.

  x_t = dropout(E[seq_t]);  h_t = GRU(h_{t-1}, x_t) at real items, h_t = h_{t-1} at padding
  states = dropout(h) ;  score(t, i) = h_t . E_i
With h_0 = 0 and left padding, padded positions never change the state, so their ids
cannot leak. Trained with BCE and one sampled negative per position (the common
next-item setting of RecBole-style GRU4Rec; the session-parallel TOP1/BPR-max loss of the
paper assumes session mini-batches, not user sequences).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.models.cf import common

Array = ct.Array


class _MaskedGRUStep(nn.Module):
  """One GRU step that keeps the carry where the position is padding."""
  features: int

  @nn.compact
  def __call__(self, h: Array, inputs: tuple[Array, Array]) -> tuple[Array, Array]:
    x, m = inputs
    cell = nn.GRUCell(
        self.features, name="cell",
        kernel_init=common.logical(common.xavier_normal, (ct.EMBED, ct.MLP)),
        recurrent_kernel_init=common.logical(nn.initializers.orthogonal(), (None, ct.MLP)),
        bias_init=common.logical(nn.initializers.zeros, (ct.MLP,)))
    h_new, _ = cell(h, x)
    h = jnp.where(m[:, None] > 0, h_new, h)
    return h, h


class GRU4Rec(common.CFSurface):
  """Recurrent session-based recommender; see the module docstring."""

  def setup(self):
    c = self.config
    self.item_emb = common.item_embed(c.num_items, c.hidden_dim)
    self.emb_dropout = nn.Dropout(c.dropout)
    self.out_dropout = nn.Dropout(c.dropout)
    self.gru = nn.scan(_MaskedGRUStep, variable_broadcast="params",
                       split_rngs={"params": False}, in_axes=1, out_axes=1)(
                           c.hidden_dim, name="gru")

  def item_table(self) -> Array:
    return self.item_emb.embedding

  def encode(self, seq: Array, deterministic: bool = True) -> Array:
    """float[B, L, D] GRU states of the left-padded seq int32[B, L]."""
    mask = (seq != 0).astype(jnp.float32)
    x = self.item_emb(seq) * mask[..., None]
    x = self.emb_dropout(x, deterministic=deterministic)
    h0 = jnp.zeros((seq.shape[0], self.config.hidden_dim), x.dtype)
    _, states = self.gru(h0, (x, mask))
    return self.out_dropout(states, deterministic=deterministic)
