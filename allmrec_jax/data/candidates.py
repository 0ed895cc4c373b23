"""Fixed evaluation candidate sets, drawn once from a seed and stored with the split.

For every user and each of (valid, test) x (19, 100): distinct negatives outside the
user's whole history (all of its items, targets included). 19 negatives + the target give
the paper's 20-candidate protocol; 100 negatives the SASRec protocol.
"""

from __future__ import annotations

import numpy as np

from allmrec_jax.data import sampling

# Stream tags: the four sets are independent streams of one seed.
_TAGS = {("valid", 19): 1, ("test", 19): 2, ("valid", 100): 3, ("test", 100): 4}


CHUNK = 8192   # users per vectorised call (bounds the temporaries on large datasets)


def sample_user_negatives(users: np.ndarray, k: int, index: sampling.ExclusionIndex,
                          seed: int, tag: int) -> np.ndarray:
  """int32[R, k] distinct negatives per row user, from Philox(key=[seed, tag]).

  Rows are processed in chunks of CHUNK users, in order, from one generator stream.
  """
  rng = np.random.Generator(np.random.Philox(key=[int(seed), int(tag)]))
  draw = sampling.generator_draw(index.num_items, rng)
  users = np.asarray(users, np.int64)
  out = np.zeros((users.size, k), np.int32)
  for lo in range(0, users.size, CHUNK):
    out[lo:lo + CHUNK] = sampling.sample_excluding(
        users[lo:lo + CHUNK], k, index, draw, distinct=True,
        fallback_seed=int(seed) * 7919 + int(tag) + lo)
  return out


def make_eval_negatives(seq_offsets: np.ndarray, seq_items: np.ndarray, num_items: int,
                        seed: int) -> dict[str, np.ndarray]:
  """{"valid_neg19": int32[U, 19], "test_neg19", "valid_neg100", "test_neg100"}."""
  num_users = len(seq_offsets) - 1
  index = sampling.ExclusionIndex.from_ranges(seq_offsets[:-1], seq_offsets[1:],
                                              np.asarray(seq_items), num_items)
  users = np.arange(num_users)
  out = {}
  for (split, k), tag in _TAGS.items():
    out[f"{split}_neg{k}"] = sample_user_negatives(users, k, index, seed, tag)
  return out
