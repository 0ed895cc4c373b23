"""Dropout whose mask costs a fraction of the random bits of `flax.linen.Dropout`.

`nn.Dropout` draws one 32-bit threefry word per element (`jax.random.bernoulli`); on a CPU
that hashing is a visible share of a small model's step (SBERT fine-tuning in stage 1,
SASRec). This layer cuts each 32-bit word into 32/b fields of b bits and keeps element i
when its field u_i >= round(rate * 2^b), u_i uniform on {0, ..., 2^b - 1}. The width b is
the smallest of 1, 2, 4, 8 that represents the rate exactly (rate * 2^b an integer), else
16. So rate 0.5 costs one random bit per element (32x fewer words than `nn.Dropout`) and
0.25 two bits, with the exact keep probability; any other rate uses 16-bit fields, whose
keep probability 1 - round(rate * 2^16) / 2^16 is off by < 8e-6 (e.g. 0.1 -> 0.09999084).
Kept values are scaled by 1 / (1 - rate) as in `nn.Dropout`.
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

_MAX_BITS = 16


def field_bits(rate: float) -> int:
  """Bits per element: the smallest of 1, 2, 4, 8 with rate * 2^b an integer, else 16."""
  for b in (1, 2, 4, 8):
    if float(rate) * (1 << b) == round(float(rate) * (1 << b)):
      return b
  return _MAX_BITS


def keep_mask(rng: jax.Array, rate: float, shape: Sequence[int]) -> jax.Array:
  """bool[shape]: True with probability 1 - round(rate * 2^b) / 2^b, b = field_bits(rate)."""
  n = math.prod(shape)
  b = field_bits(rate)
  threshold = int(round(float(rate) * (1 << b)))
  if threshold <= 0:
    return jnp.ones(shape, bool)
  if threshold >= 1 << b:
    return jnp.zeros(shape, bool)
  per_word = 32 // b
  words = jax.random.bits(rng, (-(-n // per_word),), jnp.uint32)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(b)
  # Field j of every word forms the j-th block of n/per_word elements (so neighbouring
  # elements come from different words).
  fields = (words[None, :] >> shifts[:, None]) & jnp.uint32((1 << b) - 1)
  return (fields.reshape(-1)[:n] >= jnp.uint32(threshold)).reshape(tuple(shape))


class Dropout(nn.Module):
  """Drop-in replacement for `nn.Dropout` with b-bit mask fields (module docstring)."""
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
