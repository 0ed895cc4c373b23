"""Feed-forward blocks: gated (SwiGLU, Llama) and plain two-layer (OPT)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.layers.linears import DenseGeneral, activation


class GatedMlp(nn.Module):
  """down(act(gate(x)) * up(x)).

  Attributes:
    hidden_dim: F.
    act: activation name ("silu").
    use_bias: biases on all three projections.
  """
  hidden_dim: int
  act: str = "silu"
  use_bias: bool = False
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32
  matmul_dtype: ct.DType | None = None   # see DenseGeneral

  @nn.compact
  def __call__(self, x: ct.Array) -> ct.Array:
    """float[B, T, E] -> float[B, T, E]."""
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
              matmul_dtype=self.matmul_dtype)
    e = x.shape[-1]
    gate = DenseGeneral((self.hidden_dim,), (ct.EMBED, ct.MLP), name="gate", **kw)(x)
    up = DenseGeneral((self.hidden_dim,), (ct.EMBED, ct.MLP), name="up", **kw)(x)
    h = activation(self.act)(gate) * up
    h = nn.with_logical_constraint(h, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_HEADS))
    return DenseGeneral((e,), (ct.MLP, ct.EMBED), name="down", **kw)(h)


class Mlp(nn.Module):
  """fc2(act(fc1(x))).

  Attributes:
    hidden_dim: F.
    act: activation name ("relu" for OPT).
    use_bias: biases on both projections.
  """
  hidden_dim: int
  act: str = "relu"
  use_bias: bool = True
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32
  matmul_dtype: ct.DType | None = None   # see DenseGeneral

  @nn.compact
  def __call__(self, x: ct.Array) -> ct.Array:
    """float[B, T, E] -> float[B, T, E]."""
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
              matmul_dtype=self.matmul_dtype)
    e = x.shape[-1]
    h = activation(self.act)(DenseGeneral((self.hidden_dim,), (ct.EMBED, ct.MLP), name="fc1", **kw)(x))
    h = nn.with_logical_constraint(h, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_HEADS))
    return DenseGeneral((e,), (ct.MLP, ct.EMBED), name="fc2", **kw)(h)
