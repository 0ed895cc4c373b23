"""NextItNet (Yuan et al., WSDM 2019): stacked dilated causal residual conv blocks.

  x = dropout(E[seq]) * m
  per block (dilation d from config.dilations, cycled over config.conv_blocks blocks):
    y = ReLU(LN(CausalConv_k,d(x)));  y = ReLU(LN(CausalConv_k,2d(y)));  x = (x + y) * m
  score(t, i) = x_t . E_i
Causal convolutions pad (k-1)*dilation zeros on the left only, so position t never sees
t' > t; multiplying by the timeline mask m keeps padding positions at zero, so padded ids
cannot leak. Defaults follow RecBole (kernel 3, dilations [1, 4], 5 blocks).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.models.cf import common

Array = ct.Array


class CausalConv(nn.Module):
  """1-D causal dilated convolution over float[B, L, D], computed as one matmul.

  y_t = b + sum_j x_{t - (k-1-j) d} W_j   (x_{<0} = 0), i.e. nn.Conv with kernel
  (k, D_in, D_out), kernel_dilation d and (k-1)d zeros padded on the left; the k shifted
  copies are concatenated and multiplied once (XLA's dilated-conv backward is slow on CPU).
  """
  features: int
  kernel_size: int
  dilation: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, d = self.kernel_size, self.dilation
    d_in = x.shape[-1]
    kernel = self.param("kernel", common.logical(common.xavier_normal, (None, ct.EMBED, ct.MLP)),
                        (k, d_in, self.features))
    bias = self.param("bias", common.logical(common.torch_default_bias(d_in * k), (ct.MLP,)),
                      (self.features,))
    length = x.shape[1]
    pad = jnp.pad(x, ((0, 0), ((k - 1) * d, 0), (0, 0)))
    taps = [pad[:, j * d:j * d + length] for j in range(k)]  # tap j = x_{t-(k-1-j)d}
    return jnp.concatenate(taps, axis=-1) @ kernel.reshape(k * d_in, self.features) + bias


class ResidualBlock(nn.Module):
  """conv(d) -> LN -> ReLU -> conv(2d) -> LN -> ReLU, plus the input."""
  dim: int
  kernel_size: int
  dilation: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = CausalConv(self.dim, self.kernel_size, self.dilation, name="conv1")(x)
    y = nn.relu(common.layer_norm(eps=1e-8, name="ln1")(y))
    y = CausalConv(self.dim, self.kernel_size, 2 * self.dilation, name="conv2")(y)
    y = nn.relu(common.layer_norm(eps=1e-8, name="ln2")(y))
    return x + y


class NextItNet(common.CFSurface):
  """Dilated causal CNN for next-item recommendation; see the module docstring."""

  def setup(self):
    c = self.config
    self.item_emb = common.item_embed(c.num_items, c.hidden_dim)
    self.emb_dropout = nn.Dropout(c.dropout)
    dil = [c.dilations[i % len(c.dilations)] for i in range(c.conv_blocks)]
    self.blocks = [ResidualBlock(c.hidden_dim, c.kernel_size, d, name=f"block_{i}")
                   for i, d in enumerate(dil)]

  def item_table(self) -> Array:
    return self.item_emb.embedding

  def encode(self, seq: Array, deterministic: bool = True) -> Array:
    """float[B, L, D] states of the left-padded seq int32[B, L]."""
    mask = common.timeline_mask(seq)
    x = self.emb_dropout(self.item_emb(seq), deterministic=deterministic) * mask
    for block in self.blocks:
      x = block(x) * mask
    return x
