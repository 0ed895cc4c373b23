"""Stage-1 auto-encoders: the item side and the text side of the joint embedding.

  ItemAutoEncoder:  e = sigmoid(W_1 E_i + b_1)   (d -> latent);  E^ = W_2 e + b_2 (latent -> d)
  TextAutoEncoder:  q = sigmoid(W_3 Q_i + b_3)   (t -> latent);  Q^ = W_4 q + b_4 (latent -> t)
e_i is A-LLMRec's joint collaborative-text embedding. Both layers use torch.nn.Linear's
default init (kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))), as the paper's code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allmrec_jax import common_types as ct

Array = ct.Array


def _torch_linear_init(fan_in: int):
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _linear(features: int, fan_in: int, axes: tuple[str, str], name: str) -> nn.Dense:
  init = _torch_linear_init(fan_in)
  return nn.Dense(features, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(init, (axes[1],)))


class _AutoEncoder(nn.Module):
  """Linear(dim -> latent) + sigmoid, Linear(latent -> dim)."""
  dim: int
  latent_dim: int = 128

  def setup(self):
    self.encoder = _linear(self.latent_dim, self.dim, (ct.EMBED, ct.LATENT), "encoder")
    self.decoder = _linear(self.dim, self.latent_dim, (ct.LATENT, ct.EMBED), "decoder")

  def encode(self, x: Array) -> Array:
    """float[..., dim] -> float[..., latent] in (0, 1)."""
    return jax.nn.sigmoid(self.encoder(x))

  def decode(self, z: Array) -> Array:
    """float[..., latent] -> float[..., dim]."""
    return self.decoder(z)

  def __call__(self, x: Array) -> tuple[Array, Array]:
    """float[..., dim] -> (latent float[..., latent], reconstruction float[..., dim])."""
    z = self.encode(x)
    return z, self.decode(z)


class ItemAutoEncoder(_AutoEncoder):
  """f_I: CF item embedding E_i (d) <-> joint embedding e_i (latent)."""


class TextAutoEncoder(_AutoEncoder):
  """f_T: SBERT embedding Q_i (t) <-> q_i (latent)."""
