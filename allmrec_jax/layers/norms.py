"""Normalisation layers (computed in float32, returned in the compute dtype)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from allmrec_jax import common_types as ct


class RMSNorm(nn.Module):
  """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * scale (Llama style).

  Attributes:
    eps: added to the mean square.
    dtype: output dtype.
    param_dtype: dtype of `scale`.
  """
  eps: float = 1e-6
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32

  @nn.compact
  def __call__(self, x: ct.Array) -> ct.Array:
    """float[..., E] -> float[..., E]."""
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (ct.NORM,)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps))
    # transformers casts back to the input dtype before the scale multiply.
    return (scale.astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nn.Module):
  """Standard layer norm with optional elementwise affine (OPT, BERT).

  Attributes:
    eps: variance epsilon.
    use_affine: learn `scale` and `bias` (False = plain normalisation).
    dtype: output dtype.
    param_dtype: dtype of `scale`/`bias`.
  """
  eps: float = 1e-5
  use_affine: bool = True
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32

  @nn.compact
  def __call__(self, x: ct.Array) -> ct.Array:
    """float[..., E] -> float[..., E]."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    xc = xf - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    y = xc * jnp.reciprocal(jnp.sqrt(var + self.eps))
    if self.use_affine:
      e = x.shape[-1]
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (ct.NORM,)),
                         (e,), self.param_dtype)
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (ct.NORM,)),
                        (e,), self.param_dtype)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)
