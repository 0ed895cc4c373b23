"""CF losses on tiny hand-checked inputs."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from allmrec_jax import losses


def _bce(x, y):
  s = 1 / (1 + math.exp(-x))
  return -(y * math.log(s) + (1 - y) * math.log(1 - s))


def test_bce_with_logits_values_and_stability():
  x = jnp.array([0.0, 2.0, -3.0, 100.0, -100.0])
  y = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
  got = np.asarray(losses.bce_with_logits(x, y))
  want = [math.log(2), _bce(2.0, 0), _bce(-3.0, 1), 0.0, 0.0]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert np.isfinite(np.asarray(losses.bce_with_logits(jnp.array([1e4, -1e4]), 1.0))).all()


def test_sasrec_bce_loss_hand_checked():
  # Two users, three positions; pos == 0 marks padding targets (ignored).
  pos_logits = jnp.array([[9.0, 0.0, 2.0], [1.0, -1.0, 0.5]])
  neg_logits = jnp.array([[9.0, 1.0, -2.0], [0.0, 3.0, -0.5]])
  pos = jnp.array([[0, 5, 7], [3, 4, 2]])
  real = [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
  want = (sum(_bce(float(pos_logits[i]), 1) for i in real) / 5
          + sum(_bce(float(neg_logits[i]), 0) for i in real) / 5)
  got = float(losses.sasrec_bce_loss(pos_logits, neg_logits, pos))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Row mask drops user 1 entirely.
  want0 = (_bce(0.0, 1) + _bce(2.0, 1)) / 2 + (_bce(1.0, 0) + _bce(-2.0, 0)) / 2
  got0 = float(losses.sasrec_bce_loss(pos_logits, neg_logits, pos, jnp.array([1.0, 0.0])))
  np.testing.assert_allclose(got0, want0, rtol=1e-6)


def test_bpr_loss_hand_checked():
  pos_logits = jnp.array([[3.0, 1.0]])
  neg_logits = jnp.array([[1.0, 1.0]])
  pos = jnp.array([[4, 0]])
  want = -math.log(1 / (1 + math.exp(-2.0)))
  np.testing.assert_allclose(float(losses.bpr_loss(pos_logits, neg_logits, pos)), want,
                             rtol=1e-6)
