"""Stage-1 loss functions against hand computations on tiny inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import losses


def _bce(x, y):
  p = 1 / (1 + np.exp(-x))
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_mse_is_torch_mean_over_batch_and_features():
  a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], np.float32)
  b = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
  # squares: [0, 4, 9], [1, 1, 0] -> sum 15 over 6 entries
  np.testing.assert_allclose(losses.row_weighted_mse(a, b), 15 / 6, rtol=1e-6)
  # padding row 1 masked: 13 over 3 entries
  np.testing.assert_allclose(losses.row_weighted_mse(a, b, np.array([1.0, 0.0])), 13 / 3,
                             rtol=1e-6)


def test_matching_and_item_recon_sum_pos_and_neg():
  e_p = np.array([[0.5, 0.5]], np.float32)
  q_p = np.array([[0.0, 1.0]], np.float32)      # (0.25 + 0.25) / 2 = 0.25
  e_n = np.array([[1.0, 0.0]], np.float32)
  q_n = np.array([[0.0, 0.0]], np.float32)      # 1 / 2 = 0.5
  np.testing.assert_allclose(losses.stage1_matching_loss(e_p, q_p, e_n, q_n), 0.75, rtol=1e-6)
  np.testing.assert_allclose(losses.stage1_item_recon_loss(e_p, q_p, e_n, q_n), 0.75,
                             rtol=1e-6)


def test_text_recon_value_and_stop_gradient():
  rec_p = jnp.array([[1.0, 2.0]])
  rec_n = jnp.array([[0.0, 0.0]])
  t_p = jnp.array([[0.0, 0.0]])
  t_n = jnp.array([[2.0, 0.0]])
  # (1 + 4)/2 + (4 + 0)/2 = 4.5
  np.testing.assert_allclose(losses.stage1_text_recon_loss(rec_p, t_p, rec_n, t_n), 4.5,
                             rtol=1e-6)
  g_target = jax.grad(lambda t: losses.stage1_text_recon_loss(rec_p, t, rec_n, t_n))(t_p)
  np.testing.assert_array_equal(g_target, 0.0)
  g_rec = jax.grad(lambda r: losses.stage1_text_recon_loss(r, t_p, rec_n, t_n))(rec_p)
  np.testing.assert_allclose(g_rec, [[1.0, 2.0]], rtol=1e-6)  # 2 (r - t) / 2


def test_rec_loss_is_bce_of_mean_product():
  user = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)
  dec_p = np.array([[2.0, 1.0], [1.0, 1.0]], np.float32)
  dec_n = np.array([[-1.0, 0.0], [4.0, 0.0]], np.float32)
  s_p = (user * dec_p).mean(-1)   # [2.0, -0.25]
  s_n = (user * dec_n).mean(-1)   # [-0.5, 1.0]
  want = _bce(s_p, 1.0).mean() + _bce(s_n, 0.0).mean()
  np.testing.assert_allclose(losses.stage1_rec_loss(user, dec_p, dec_n), want, rtol=1e-6)
  w = np.array([0.0, 1.0], np.float32)
  want_w = _bce(s_p[1], 1.0) + _bce(s_n[1], 0.0)
  np.testing.assert_allclose(losses.stage1_rec_loss(user, dec_p, dec_n, w), want_w, rtol=1e-6)


def test_total_loss_weights_and_ablation_switches():
  terms = {"rec": 1.0, "match": 2.0, "item_recon": 4.0, "text_recon": 8.0}
  np.testing.assert_allclose(losses.stage1_total_loss(terms), 1 + 2 + 2 + 1.6, rtol=1e-6)
  np.testing.assert_allclose(
      losses.stage1_total_loss(terms, w_rec=0.0, w_match=0.0, w_item_recon=1.0,
                               w_text_recon=0.0), 4.0)
