"""EvalSet: the prompt order of the candidates and its inverse (a bug in `unpermute` would
scramble every LLM metric while leaving them plausible)."""

from __future__ import annotations

import numpy as np
import pytest

from allmrec_jax.trainers import evaluate as eval_lib


def _eval_set(rng, b=6, c=20):
  # Disjoint item ranges per user: one item's score never decides another user's row.
  cands = np.stack([rng.permutation(np.arange(1, 26) + 25 * r)[:c]
                    for r in range(b)]).astype(np.int32)
  order = np.stack([rng.permutation(c) for _ in range(b)]).astype(np.int32)
  seq = rng.integers(1, 200, (b, 12)).astype(np.int32)
  return eval_lib.EvalSet(np.arange(b, dtype=np.int32), seq, seq[:, -4:], cands, order)


def test_unpermute_inverts_the_prompt_order():
  rng = np.random.default_rng(0)
  es = _eval_set(rng)
  # A score per candidate item; the LLM sees them in prompt order.
  per_item = rng.standard_normal(200)
  per_item[es.targets[:3]] = 10.0                 # three users' targets score highest
  prompt_scores = per_item[es.prompt_candidates]
  np.testing.assert_array_equal(es.unpermute(prompt_scores), per_item[es.candidates])
  # The target (candidate column 0) lands in prompt slot j where order[b, j] == 0.
  slot = np.argmax(es.order == 0, axis=1)
  np.testing.assert_array_equal(es.prompt_candidates[np.arange(6), slot], es.targets)
  # Ranking from unpermuted scores: the target is first exactly when its score is highest.
  top = np.argmax(prompt_scores, axis=1)
  hit = es.prompt_candidates[np.arange(6), top] == es.targets
  assert hit[:3].all() and hit.sum() < 6
  m = eval_lib.ranking_metrics(es.unpermute(prompt_scores), "")
  assert m["hit@1"] == pytest.approx(hit.mean())


def test_take_keeps_rows_aligned():
  es = _eval_set(np.random.default_rng(1))
  sub = es.take(np.array([4, 1]))
  np.testing.assert_array_equal(sub.candidates, es.candidates[[4, 1]])
  np.testing.assert_array_equal(sub.prompt_candidates, es.prompt_candidates[[4, 1]])
  np.testing.assert_array_equal(sub.users, [4, 1])
