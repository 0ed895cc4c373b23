"""layers/dropout.py: b-bit-field dropout has nn.Dropout's contract and statistics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax.layers import dropout as dropout_lib


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.9])
def test_keep_fraction_and_scale(rate):
  """Kept fraction within 5 sigma of 1 - round(rate*2^b)/2^b; kept values scaled 1/(1-rate)."""
  x = jnp.ones((257, 1001))           # odd element count: the last 32-bit word is half used
  y = np.asarray(dropout_lib.Dropout(rate).apply({}, x, deterministic=False,
                                                 rngs={"dropout": jax.random.key(0)}))
  kept = y != 0
  b = dropout_lib.field_bits(rate)
  keep = 1.0 - round(rate * 2 ** b) / 2 ** b
  n = x.size
  assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)
  np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)
  # The fields of one word are not copies of each other: rows differ.
  assert not np.array_equal(kept[:128], kept[128:256])


def test_masks_depend_on_key_and_match_nothing_trivial():
  x = jnp.ones((64, 50))
  f = lambda k: np.asarray(dropout_lib.Dropout(0.5).apply({}, x, deterministic=False,
                                                          rngs={"dropout": jax.random.key(k)}))
  a, b = f(1), f(2)
  np.testing.assert_array_equal(a, f(1))          # deterministic given the key
  assert (a != b).mean() > 0.3                    # independent-looking across keys
  # Positions are not correlated with the element index: each column keeps ~half.
  assert (a != 0).mean(0).min() > 0.25 and (a != 0).mean(0).max() < 0.75


def test_identity_cases_and_broadcast_dims():
  x = jax.random.normal(jax.random.key(0), (8, 6, 5))
  key = {"dropout": jax.random.key(3)}
  for mod, det in [(dropout_lib.Dropout(0.3), True), (dropout_lib.Dropout(0.0), False)]:
    np.testing.assert_array_equal(mod.apply({}, x, deterministic=det, rngs=key), x)
  np.testing.assert_array_equal(dropout_lib.Dropout(1.0).apply({}, x, deterministic=False), 0)
  y = np.asarray(dropout_lib.Dropout(0.5, broadcast_dims=(1,)).apply(
      {}, x, deterministic=False, rngs=key))
  kept = y != 0
  assert (kept == kept[:, :1]).all()              # one mask shared along axis 1
  with pytest.raises(ValueError):                 # deterministic given neither way
    dropout_lib.Dropout(0.5).apply({}, x, rngs=key)


def test_gradient_matches_mask():
  x = jnp.arange(1.0, 201.0)
  f = lambda v: dropout_lib.Dropout(0.25).apply({}, v, deterministic=False,
                                                rngs={"dropout": jax.random.key(7)}).sum()
  g = np.asarray(jax.grad(f)(x))
  y = np.asarray(dropout_lib.Dropout(0.25).apply({}, x, deterministic=False,
                                                 rngs={"dropout": jax.random.key(7)}))
  np.testing.assert_allclose(g, (y != 0) / 0.75, rtol=1e-6)
  assert isinstance(dropout_lib.Dropout(0.1), nn.Module)


def test_field_bits_exact_for_dyadic_rates():
  """Dyadic rates get the fewest exact bits (0.5 -> 1 bit); others 16 bits, as before."""
  assert [dropout_lib.field_bits(r) for r in (0.5, 0.25, 0.75, 0.125, 0.1, 0.3, 0.9)] == [
      1, 2, 2, 4, 16, 16, 16]
  # Rate 0.5 draws one 32-bit word per 32 elements, and each element's bit is used once:
  # the mask equals the bits of those words laid out field-major.
  key, n = jax.random.key(5), 96
  mask = np.asarray(dropout_lib.keep_mask(key, 0.5, (n,)))
  words = np.asarray(jax.random.bits(key, (n // 32,), jnp.uint32))
  bits = (words[None, :] >> np.arange(32, dtype=np.uint32)[:, None]) & 1
  np.testing.assert_array_equal(mask, bits.reshape(-1) == 1)
  # 16-bit rates: the two halves of each word, low halves first (the mask of earlier runs).
  mask = np.asarray(dropout_lib.keep_mask(key, 0.1, (7,)))
  words = np.asarray(jax.random.bits(key, (4,), jnp.uint32))
  halves = np.concatenate([words & 0xFFFF, words >> 16])[:7]
  np.testing.assert_array_equal(mask, halves >= round(0.1 * 65536))
