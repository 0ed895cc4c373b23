"""Ranking metrics against hand-computed arrays."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax import metrics


def test_rank_of_target_ties_pessimistic():
  scores = np.array([[0.5, 0.1, 0.9, 0.5],    # 0.9 above, 0.5 tie -> rank 2
                     [3.0, 1.0, 2.0, 0.0],    # best -> 0
                     [1.0, 1.0, 1.0, 1.0]])   # all tied -> last (3)
  np.testing.assert_array_equal(metrics.rank_of_target(scores), [2, 0, 3])
  np.testing.assert_array_equal(metrics.rank_of_target(jnp.asarray(scores)), [2, 0, 3])
  np.testing.assert_array_equal(metrics.rank_of_target(scores, target_col=1), [3, 2, 3])


def test_rank_of_item_with_mask():
  scores = np.array([[9.0, 0.2, 0.8, 0.5, 0.7]])      # column 0 = padding (masked)
  valid = np.array([[False, True, False, True, True]])  # item 2 is in the history
  # target 3 (0.5): above it among valid, non-target: item 4 (0.7) -> rank 1
  np.testing.assert_array_equal(metrics.rank_of_item(scores, np.array([3]), valid), [1])
  np.testing.assert_array_equal(metrics.rank_of_item(scores, np.array([3])), [3])


def test_hit_ndcg_mrr():
  ranks = np.array([0, 1, 4, 10])
  np.testing.assert_array_equal(metrics.hit_at_k(ranks, 1), [1, 0, 0, 0])
  np.testing.assert_array_equal(metrics.hit_at_k(ranks, 5), [1, 1, 1, 0])
  np.testing.assert_allclose(metrics.ndcg_at_k(ranks, 5),
                             [1.0, 1 / math.log2(3), 1 / math.log2(6), 0.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.mrr(ranks), [1, 1 / 2, 1 / 5, 1 / 11], rtol=1e-6)
  np.testing.assert_array_equal(metrics.recall_at_k(ranks, 10), [1, 1, 1, 0])


def test_ranking_metrics_keys_and_values():
  scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.3]])   # ranks 0 and 2
  m = metrics.ranking_metrics(scores, ks=(1, 3), prefix="test/")
  assert m["test/hit@1"] == pytest.approx(0.5)
  assert m["test/hit@3"] == pytest.approx(1.0)
  assert m["test/ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
  assert m["test/mrr"] == pytest.approx((1 + 1 / 3) / 2)


def test_cf_protocol_metrics():
  r20, r101, rfull = np.array([0, 3]), np.array([2, 12]), np.array([5, 30])
  m = metrics.cf_protocol_metrics(r20, r101, rfull, prefix="test/")
  assert m["test/hit@1"] == 0.5 and m["test/hit@5"] == 1.0
  assert m["test/hr@10_neg100"] == 0.5
  assert m["test/ndcg@10_neg100"] == pytest.approx(0.5 / math.log2(4))
  assert m["test/recall@10"] == 0.5 and m["test/recall@20"] == 0.5
  assert m["test/ndcg@20"] == pytest.approx(0.5 / math.log2(7))
  assert m["test/ndcg@10_c20"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
  # Weighted subgroup: only user 1.
  w = metrics.cf_protocol_metrics(r20, r101, rfull, prefix="x/", weights=np.array([0, 1]))
  assert w["x/hit@1"] == 0.0 and w["x/hit@5"] == 1.0 and w["x/mrr"] == pytest.approx(0.25)
