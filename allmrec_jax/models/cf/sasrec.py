"""SASRec (Kang & McAuley, ICDM 2018), as in the authors' code and pmixer's PyTorch port.

  x = E[seq] * sqrt(D) + P[pos]          pos = 1..L at real items, 0 at padding
  x = dropout(x) * m                     m = timeline mask (seq != 0)
  per block:  q = LN(x);  x = q + MHA(q, x, x; causal, attention dropout)
              x = LN(x);  x = (x + FFN(x)) * m     FFN = Lin -> drop -> ReLU -> Lin -> drop
  h = LN(x)                               all LayerNorms eps 1e-8
Scores are h_t . E_i. Parameters are xavier-normal (weights, tables; padding rows zeroed);
1-D parameters keep the torch defaults (LN ones/zeros, attention biases zero, FFN biases
uniform), as pmixer's `xavier_normal_` try/except loop leaves them. Dropout masks come from
b-bit mask fields (`layers/dropout.py`: same rates; rate 0.5 costs one random bit per element).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.layers import dropout as dropout_lib
from allmrec_jax.models.cf import common

Array = ct.Array


class CausalSelfAttention(nn.Module):
  """torch.nn.MultiheadAttention(D, H) with a fused in-projection, query != key/value."""
  dim: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, q_in: Array, kv_in: Array, deterministic: bool) -> Array:
    """q_in, kv_in float[B, L, D] -> float[B, L, D] with a causal mask."""
    d, h = self.dim, self.num_heads
    if d % h:
      raise ValueError(f"config.cf.hidden_dim={d} must be divisible by num_heads={h}")
    # One (D, 3D) kernel like torch's in_proj_weight (3D, D): same xavier fan.
    w_in = self.param("in_proj_kernel", common.logical(common.xavier_normal, (ct.EMBED, ct.HEADS)),
                      (d, 3 * d))
    b_in = self.param("in_proj_bias", common.logical(nn.initializers.zeros, (ct.HEADS,)), (3 * d,))
    b, l, _ = q_in.shape
    hd = d // h
    q = q_in @ w_in[:, :d] + b_in[:d]
    kv = kv_in @ w_in[:, d:] + b_in[d:]        # keys and values in one matmul
    k, v = kv[..., :d], kv[..., d:]
    causal = jnp.tril(jnp.ones((l, l), dtype=bool))
    scale = jnp.asarray(1.0 / hd ** 0.5, q.dtype)
    if h == 1:                                  # SASRec's default: no head axis to move
      logits = jnp.einsum("bqd,bkd->bqk", q, k) * scale
    else:
      q, k, v = (t.reshape(b, l, h, hd) for t in (q, k, v))
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = dropout_lib.Dropout(self.dropout)(weights, deterministic=deterministic)
    if h == 1:
      out = jnp.einsum("bqk,bkd->bqd", weights, v)
    else:
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, d)
    return common.dense(d, d, ct.HEADS, ct.EMBED, name="out_proj",
                        bias_init=nn.initializers.zeros)(out)


class PointWiseFeedForward(nn.Module):
  """Conv1d(k=1) -> dropout -> ReLU -> Conv1d(k=1) -> dropout, plus the input."""
  dim: int
  dropout: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    y = common.dense(self.dim, self.dim, ct.EMBED, ct.MLP, name="conv1")(x)
    y = dropout_lib.Dropout(self.dropout)(y, deterministic=deterministic)
    y = nn.relu(y)
    y = common.dense(self.dim, self.dim, ct.MLP, ct.EMBED, name="conv2")(y)
    y = dropout_lib.Dropout(self.dropout)(y, deterministic=deterministic)
    return y + x


class SASRec(common.CFSurface):
  """Self-attentive sequential recommendation; see the module docstring."""

  def setup(self):
    c = self.config
    self.item_emb = common.item_embed(c.num_items, c.hidden_dim)
    self.pos_emb = nn.Embed(c.maxlen + 1, c.hidden_dim, name="pos_emb",
                            embedding_init=common.logical(common.padded_table_init(),
                                                          (None, ct.EMBED)))
    self.emb_dropout = dropout_lib.Dropout(c.dropout)
    self.attention_layernorms = [common.layer_norm(name=f"attn_ln_{i}") for i in range(c.num_blocks)]
    self.attention_layers = [CausalSelfAttention(c.hidden_dim, c.num_heads, c.dropout,
                                                 name=f"attn_{i}") for i in range(c.num_blocks)]
    self.forward_layernorms = [common.layer_norm(name=f"ffn_ln_{i}") for i in range(c.num_blocks)]
    self.forward_layers = [PointWiseFeedForward(c.hidden_dim, c.dropout, name=f"ffn_{i}")
                           for i in range(c.num_blocks)]
    self.last_layernorm = common.layer_norm(name="last_ln")

  def item_table(self) -> Array:
    return self.item_emb.embedding

  def encode(self, seq: Array, deterministic: bool = True) -> Array:
    """float[B, L, D] states of the left-padded seq int32[B, L]."""
    c = self.config
    if seq.shape[-1] > c.maxlen:
      raise ValueError(f"SASRec: sequence length {seq.shape[-1]} > maxlen {c.maxlen} "
                       "(config.data.maxlen)")
    mask = common.timeline_mask(seq)
    x = self.item_emb(seq) * (c.hidden_dim ** 0.5)
    positions = jnp.arange(1, seq.shape[-1] + 1, dtype=jnp.int32)[None, :] * (seq != 0)
    x = x + self.pos_emb(positions)
    x = self.emb_dropout(x, deterministic=deterministic)
    x = x * mask
    for i in range(c.num_blocks):
      q = self.attention_layernorms[i](x)
      x = q + self.attention_layers[i](q, x, deterministic=deterministic)
      x = self.forward_layernorms[i](x)
      x = self.forward_layers[i](x, deterministic=deterministic)
      x = x * mask
    return self.last_layernorm(x)
