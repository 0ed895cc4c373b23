"""Dropout whose mask costs half the random bits of `flax.linen.Dropout`.

`nn.Dropout` draws one 32-bit threefry word per element (`jax.random.bernoulli`); on a CPU
that hashing is a visible share of a small model's step (SBERT fine-tuning in stage 1,
SASRec). This layer draws one 32-bit word per TWO elements and compares each 16-bit half
with a threshold: element i is kept when u_i >= round(rate * 2^16), u_i uniform on
{0, ..., 2^16 - 1}. The keep probability is therefore 1 - round(rate * 2^16) / 2^16 (exact
for rates that are multiples of 2^-16, such as 0.5 and 0.25; off by < 8e-6 otherwise, e.g.
0.1 -> 0.09999084) and kept values are scaled by 1 / (1 - rate) as in `nn.Dropout`.
Same attributes and call signature as `nn.Dropout` (rate, broadcast_dims, deterministic,
rng_collection; call-time `deterministic` and `rng`).
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from allmrec_jax import common_types as ct

_LEVELS = 1 << 16


def keep_mask(rng: jax.Array, rate: float, shape: Sequence[int]) -> jax.Array:
  """bool[shape]: True with probability 1 - round(rate * 2^16) / 2^16, from 16-bit draws."""
  n = math.prod(shape)
  threshold = int(round(float(rate) * _LEVELS))
  if threshold <= 0:
    return jnp.ones(shape, bool)
  if threshold >= _LEVELS:
    return jnp.zeros(shape, bool)
  words = jax.random.bits(rng, (-(-n // 2),), jnp.uint32)
  halves = jnp.concatenate([words & jnp.uint32(0xFFFF), words >> jnp.uint32(16)])[:n]
  return (halves >= jnp.uint32(threshold)).reshape(tuple(shape))


class Dropout(nn.Module):
  """Drop-in replacement for `nn.Dropout` with 16-bit mask draws (module docstring)."""
  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, inputs: ct.Array, deterministic: bool | None = None,
               rng: jax.Array | None = None) -> ct.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = jnp.broadcast_to(keep_mask(rng, self.rate, shape), inputs.shape)
    keep = 1.0 - self.rate
    return lax.select(mask, inputs / jnp.asarray(keep, inputs.dtype), jnp.zeros_like(inputs))
