"""Loss functions: pure array functions, each with its formula.

Stage 0 (CF) losses first; later stages append theirs below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from allmrec_jax import common_types as ct

Array = ct.Array


def bce_with_logits(logits: Array, labels: Array) -> Array:
  """Elementwise binary cross-entropy on logits (numerically stable).

  l(x, y) = -[y log sigma(x) + (1 - y) log(1 - sigma(x))]
          = max(x, 0) - x y + log(1 + exp(-|x|))
  Args:
    logits: float[...]; labels: float[...] in [0, 1] (broadcastable).
  Returns:
    float[...] per-element losses (no reduction).
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def masked_mean(values: Array, weights: Array) -> Array:
  """sum(values * w) / max(sum(w), 1)  over all elements; float[] scalar."""
  weights = jnp.asarray(weights, jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def position_weights(pos: Array, row_mask: Array | None) -> Array:
  """float[B, L] weights m of the CF losses: [pos != 0] * row_mask[:, None]."""
  w = (pos != 0).astype(jnp.float32)
  if row_mask is not None:
    w = w * jnp.asarray(row_mask, jnp.float32)[:, None]
  return w


def sasrec_bce_loss(pos_logits: Array, neg_logits: Array, pos: Array,
                    row_mask: Array | None = None) -> Array:
  """SASRec's training loss (Kang & McAuley; pmixer port), float[] scalar.

  With m_{b,t} = [pos_{b,t} != 0] * r_b (non-padding target positions of real rows) and
  M = sum m:
    loss = (1/M) sum m * -log sigma(s^+)  +  (1/M) sum m * -log(1 - sigma(s^-))
  Args:
    pos_logits, neg_logits: float[B, L] scores of the true next item / the sampled negative.
    pos: int32[B, L] true next items (0 = padding position, excluded).
    row_mask: float[B] or None; 0 drops a padding row of the batch.
  """
  w = position_weights(pos, row_mask)
  return (masked_mean(bce_with_logits(pos_logits, 1.0), w)
          + masked_mean(bce_with_logits(neg_logits, 0.0), w))


def bpr_loss(pos_logits: Array, neg_logits: Array, pos: Array,
             row_mask: Array | None = None) -> Array:
  """Bayesian personalised ranking over non-padding positions, float[] scalar.

    loss = (1/M) sum m * -log sigma(s^+ - s^-),   m = [pos != 0] * r_b, M = sum m
  """
  w = position_weights(pos, row_mask)
  return masked_mean(-jax.nn.log_sigmoid(pos_logits - neg_logits), w)


CF_LOSSES = {"bce": sasrec_bce_loss, "bpr": bpr_loss}


# ---------------------------------------------------------------------------- stage 1
def row_weighted_mse(pred: Array, target: Array, weights: Array | None = None) -> Array:
  """Mean squared error over batch and features (torch MSELoss default), float[] scalar.

    mse = sum_{b,f} w_b (pred_{b,f} - target_{b,f})^2 / (F * sum_b w_b)
  With w = 1 this is mean((pred - target)^2). pred, target float[B, F]; weights float[B]
  (0 on padding rows) or None.
  """
  sq = jnp.square(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32))
  if weights is None:
    return jnp.mean(sq)
  w = jnp.asarray(weights, jnp.float32)
  return jnp.sum(sq * w[:, None]) / (sq.shape[-1] * jnp.maximum(jnp.sum(w), 1.0))


def row_weighted_mean(values: Array, weights: Array | None = None) -> Array:
  """sum_b w_b v_b / sum_b w_b (plain mean when weights is None); float[] scalar."""
  if weights is None:
    return jnp.mean(values)
  return masked_mean(values, weights)


def stage1_matching_loss(e_pos: Array, q_pos: Array, e_neg: Array, q_neg: Array,
                         weights: Array | None = None) -> Array:
  """Matching: MSE(e_p, q_p) + MSE(e_n, q_n); e = f_I^enc(E), q = f_T^enc(Q), float[B, latent]."""
  return row_weighted_mse(e_pos, q_pos, weights) + row_weighted_mse(e_neg, q_neg, weights)


def stage1_item_recon_loss(rec_pos: Array, item_pos: Array, rec_neg: Array, item_neg: Array,
                           weights: Array | None = None) -> Array:
  """Item reconstruction: MSE(f_I^dec(e_p), E_p) + MSE(f_I^dec(e_n), E_n); float[B, d]."""
  return (row_weighted_mse(rec_pos, item_pos, weights)
          + row_weighted_mse(rec_neg, item_neg, weights))


def stage1_text_recon_loss(rec_pos: Array, text_pos: Array, rec_neg: Array, text_neg: Array,
                           weights: Array | None = None) -> Array:
  """Text reconstruction: MSE(f_T^dec(q_p), sg(Q_p)) + MSE(f_T^dec(q_n), sg(Q_n)); float[B, t].

  The SBERT targets are stop-gradient (the paper's `.data`): SBERT learns from this loss
  only through q = f_T^enc(Q).
  """
  sg = jax.lax.stop_gradient
  return (row_weighted_mse(rec_pos, sg(text_pos), weights)
          + row_weighted_mse(rec_neg, sg(text_neg), weights))


def stage1_rec_loss(user: Array, dec_pos: Array, dec_neg: Array,
                    weights: Array | None = None) -> Array:
  """Recommendation: BCE(s(x_u, f_I^dec(e_p)), 1) + BCE(s(x_u, f_I^dec(e_n)), 0).

    s(a, b) = mean_f a_f b_f;  each BCE is averaged over the batch.
  user, dec_pos, dec_neg: float[B, d].
  """
  s_pos = jnp.mean(user * dec_pos, axis=-1)
  s_neg = jnp.mean(user * dec_neg, axis=-1)
  return (row_weighted_mean(bce_with_logits(s_pos, 1.0), weights)
          + row_weighted_mean(bce_with_logits(s_neg, 0.0), weights))


def stage1_total_loss(terms: dict[str, Array], w_rec: float = 1.0, w_match: float = 1.0,
                      w_item_recon: float = 0.5, w_text_recon: float = 0.2) -> Array:
  """total = w_rec rec + w_match match + w_item_recon item_recon + w_text_recon text_recon.

  `terms` has keys "rec", "match", "item_recon", "text_recon" (float[] each). A weight of
  0 switches its term off (the paper's ablations).
  """
  return (w_rec * terms["rec"] + w_match * terms["match"]
          + w_item_recon * terms["item_recon"] + w_text_recon * terms["text_recon"])
