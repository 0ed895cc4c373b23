"""Ranking metrics: pure numpy/jax functions on score arrays (one target per row).

Conventions: `rank` is 0-based (0 = the target is first); ties are pessimistic (every
candidate scoring >= the target, other than the target itself, ranks above it). Key names
are shared by every stage: `{prefix}hit@k`, `{prefix}ndcg@k`, `{prefix}mrr`,
`{prefix}hr@10_neg100`, `{prefix}ndcg@10_neg100`, `{prefix}recall@k`, `{prefix}ndcg@k` (full
ranking), with prefix "valid/" or "test/".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from allmrec_jax import common_types as ct

Array = ct.Array


def rank_of_target(scores: Array, target_col: int = 0, valid: Array | None = None) -> Array:
  """0-based rank int32[B] of column `target_col` among the candidates of each row.

  rank_b = #{c != target : valid_{b,c} and scores_{b,c} >= scores_{b,target}}   (ties pessimistic)
  Args:
    scores: float[B, C]; target_col: the target's column; valid: bool[B, C] or None (all);
      invalid candidates (masked history, padding) never count.
  """
  xp = jnp if not isinstance(scores, np.ndarray) else np
  target = scores[:, target_col:target_col + 1]
  above = scores >= target
  if valid is not None:
    above = above & valid
  count = xp.sum(above, axis=1)
  # The target itself always satisfies >=; remove it unless it was masked out.
  self_counted = above[:, target_col]
  return (count - self_counted).astype(xp.int32)


def rank_of_item(scores: Array, target: Array, valid: Array | None = None) -> Array:
  """0-based rank int32[B] of item `target` int32[B] in scores float[B, N+1] (full ranking).

  rank_b = #{i != t_b : valid_{b,i} and scores_{b,i} >= scores_{b,t_b}}
  """
  xp = jnp if not isinstance(scores, np.ndarray) else np
  t_score = xp.take_along_axis(scores, target[:, None].astype(xp.int32), axis=1)
  above = scores >= t_score
  if valid is not None:
    above = above & valid
  cols = xp.arange(scores.shape[1])[None, :]
  above = above & (cols != target[:, None])
  return xp.sum(above, axis=1).astype(xp.int32)


def hit_at_k(ranks: Array, k: int) -> Array:
  """float[B]: 1 if rank < k.  (= recall@k with a single target)"""
  return (ranks < k).astype(np.float32)


def ndcg_at_k(ranks: Array, k: int) -> Array:
  """float[B]: 1 / log2(rank + 2) if rank < k else 0  (one relevant item, IDCG = 1)."""
  xp = jnp if not isinstance(ranks, np.ndarray) else np
  r = ranks.astype(np.float32)
  return xp.where(ranks < k, 1.0 / xp.log2(r + 2.0), 0.0)


def mrr(ranks: Array) -> Array:
  """float[B]: 1 / (rank + 1)."""
  return 1.0 / (ranks.astype(np.float32) + 1.0)


def recall_at_k(ranks: Array, k: int) -> Array:
  """float[B]: |top-k ∩ {target}| / |{target}| = hit@k for one held-out item."""
  return hit_at_k(ranks, k)


def ranking_metrics(scores: Array, ks: Sequence[int] = (1, 5, 10), prefix: str = "test/",
                    target_col: int = 0, suffix: str = "",
                    weights: Array | None = None) -> dict[str, float]:
  """Candidate-set metrics from scores float[B, C] with the target at `target_col`.

  Returns {prefix}hit@k and {prefix}ndcg@k for k in ks, and {prefix}mrr, each the
  (weighted) mean over rows, with `suffix` appended to every name (e.g. "_neg100").
  """
  ranks = rank_of_target(scores, target_col)
  return metrics_from_ranks(ranks, ks, prefix, suffix, weights=weights)


def metrics_from_ranks(ranks: Array, ks: Sequence[int] = (1, 5, 10), prefix: str = "test/",
                       suffix: str = "", hit_name: str = "hit",
                       weights: Array | None = None, with_mrr: bool = True) -> dict[str, float]:
  """Means of hit@k (named `hit_name`), ndcg@k and mrr over ranks int32[B]."""
  ranks = np.asarray(ranks)
  w = np.ones(ranks.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
  denom = max(float(w.sum()), 1e-12)
  mean = lambda v: float(np.sum(np.asarray(v) * w) / denom)
  out = {}
  for k in ks:
    out[f"{prefix}{hit_name}@{k}{suffix}"] = mean(hit_at_k(ranks, k))
    out[f"{prefix}ndcg@{k}{suffix}"] = mean(ndcg_at_k(ranks, k))
  if with_mrr:
    out[f"{prefix}mrr{suffix}"] = mean(mrr(ranks))
  return out


def cf_protocol_metrics(rank20: Array, rank101: Array, rank_full: Array, prefix: str = "test/",
                        weights: Array | None = None) -> dict[str, float]:
  """The three CF protocols' metrics from 0-based ranks int32[B] (one row per user).

  - 20 stored candidates (paper): hit@1, hit@5, hit@10, mrr, ndcg@10_c20
  - 100 stored negatives + target (SASRec): hr@10_neg100, ndcg@10_neg100
  - full ranking with history masked: recall@10, recall@20, ndcg@10, ndcg@20
  (`ndcg@k` without suffix is the full-ranking one; `_c20` marks the 20-candidate one.)
  """
  out = metrics_from_ranks(rank20, (1, 5, 10), prefix, weights=weights)
  for k in (1, 5):
    out.pop(f"{prefix}ndcg@{k}")
  out[f"{prefix}ndcg@10_c20"] = out.pop(f"{prefix}ndcg@10")
  out.update(metrics_from_ranks(rank101, (10,), prefix, "_neg100", hit_name="hr",
                                weights=weights, with_mrr=False))
  out.update(metrics_from_ranks(rank_full, (10, 20), prefix, "", hit_name="recall",
                                weights=weights, with_mrr=False))
  return out
