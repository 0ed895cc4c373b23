"""Vectorised negative sampling: items drawn uniformly from 1..N outside a per-user set.

Two sources of randomness, both deterministic:
- `hashed_draw(N, seed, epoch, row_ids, stream)`: a counter-based hash (splitmix64
  finaliser) of (stream, seed, epoch, user, slot, attempt). The draw of one slot depends
  only on those numbers, never on the batch it sits in or on how many hosts share the
  work, so a resumed or re-sharded epoch draws the same negatives.
- `generator_draw`: a seeded `np.random.Generator(np.random.Philox(...))`, for the fixed
  evaluation sets.

Membership tests (`ExclusionIndex`) use a dense (user, item) bitmap when it fits in
DENSE_LIMIT bytes, else one sorted int64 array of keys `user * (N + 1) + item` and
`np.searchsorted`; collisions are redrawn as a vector, never looped per item.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_OFFSET = np.uint64(0x632BE59BD9B4E019)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
  x = (x ^ (x >> _S30)) * _M1
  x = (x ^ (x >> _S27)) * _M2
  return x ^ (x >> _S31)


def hash_u64(*parts) -> np.ndarray:
  """Combines integer scalars / arrays (broadcast) into one well-mixed uint64 array."""
  shape = np.broadcast_shapes(*[np.shape(p) for p in parts])
  h = np.full(shape, 0x243F6A8885A308D3, dtype=np.uint64)
  with np.errstate(over="ignore"):
    for p in parts:
      v = np.asarray(p).astype(np.int64).astype(np.uint64)
      h = _mix(h ^ (v * _GOLDEN + _OFFSET))
  return h


def _to_items(h: np.ndarray, num_items: int) -> np.ndarray:
  # Multiply-shift on the top 32 bits: unbiased enough (N << 2**32) and fast.
  top = (h >> np.uint64(32)).astype(np.int64)
  return 1 + ((top * num_items) >> 32)


def hashed_items(num_items: int, *parts) -> np.ndarray:
  """Uniform item ids in 1..num_items from hash_u64(*parts): int64[broadcast shape]."""
  return _to_items(hash_u64(*parts), num_items)


DENSE_LIMIT = 1 << 26   # bytes of the optional dense (user, item) bitmap


class ExclusionIndex:
  """Sorted (user, item) keys: per user, the items a negative may not be.

  Attributes:
    num_items: N (items are 1..N).
    keys: int64[K] sorted unique `user * (N + 1) + item`.
    sizes: int64[U] number of distinct excluded items per user.
  """

  def __init__(self, users: np.ndarray, items: np.ndarray, num_users: int,
               num_items: int):
    self.num_items = int(num_items)
    self.num_users = int(num_users)
    keys = users.astype(np.int64) * (self.num_items + 1) + items.astype(np.int64)
    self.keys = np.unique(keys)
    self.sizes = np.bincount(self.keys // (self.num_items + 1),
                             minlength=self.num_users).astype(np.int64)
    # A dense bitmap is much faster than searchsorted when it fits in DENSE_LIMIT bytes.
    n_keys = self.num_users * (self.num_items + 1)
    self.dense = None
    if n_keys <= DENSE_LIMIT:
      self.dense = np.zeros(n_keys, bool)
      self.dense[self.keys] = True
    # keys[user_ptr[u]:user_ptr[u+1]] are user u's keys (sorted by user first).
    self.user_ptr = np.zeros(self.num_users + 1, np.int64)
    np.cumsum(self.sizes, out=self.user_ptr[1:])

  def restrict(self, users: np.ndarray) -> ExclusionIndex:
    """The same index over `users` only: a small key array that stays in cache."""
    u = np.unique(np.asarray(users, np.int64))
    idx, _ = ranges_to_index(self.user_ptr[u], self.user_ptr[u + 1])
    sub = object.__new__(ExclusionIndex)
    sub.num_items, sub.num_users = self.num_items, self.num_users
    sub.keys, sub.sizes, sub.dense, sub.user_ptr = self.keys[idx], self.sizes, None, None
    return sub

  @classmethod
  def from_ranges(cls, starts: np.ndarray, ends: np.ndarray, items: np.ndarray,
                  num_items: int) -> ExclusionIndex:
    """Excludes `items[starts[u]:ends[u]]` for each user u (int64[U] bounds)."""
    idx, users = ranges_to_index(starts, ends)
    return cls(users, items[idx], len(starts), num_items)

  def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """bool[...]: whether `items` (any shape, broadcast with `users`) is excluded."""
    k = np.asarray(users, np.int64) * (self.num_items + 1) + np.asarray(items, np.int64)
    if self.dense is not None:
      return self.dense[k]
    if self.keys.size == 0:
      return np.zeros(k.shape, bool)
    pos = np.searchsorted(self.keys, k)
    pos = np.minimum(pos, self.keys.size - 1)
    return self.keys[pos] == k

  def allowed(self, user: int) -> np.ndarray:
    """int64[A]: the items user may draw (slow path, one user)."""
    n1 = self.num_items + 1
    lo, hi = np.searchsorted(self.keys, [user * n1, (user + 1) * n1])
    return np.setdiff1d(np.arange(1, n1), self.keys[lo:hi] - user * n1)


def ranges_to_index(starts: np.ndarray, ends: np.ndarray):
  """(int64[total] flat indices of all ranges [starts[r], ends[r]), int64[total] r)."""
  starts = np.asarray(starts, np.int64)
  lengths = np.maximum(np.asarray(ends, np.int64) - starts, 0)
  total = int(lengths.sum())
  first = np.cumsum(lengths) - lengths
  rows = np.repeat(np.arange(len(starts)), lengths)
  idx = np.repeat(starts - first, lengths) + np.arange(total)
  return idx, rows


def _dup_in_row(x: np.ndarray) -> np.ndarray:
  """bool[R, K]: True where x[r, c] equals an entry of the same row at a column < c."""
  order = np.argsort(x, axis=1, kind="stable")
  s = np.take_along_axis(x, order, axis=1)
  dup_sorted = np.zeros_like(x, dtype=bool)
  dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
  out = np.zeros_like(dup_sorted)
  np.put_along_axis(out, order, dup_sorted, axis=1)
  return out


DrawFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def sample_excluding(users: np.ndarray, k: int, index: ExclusionIndex, draw: DrawFn,
                     *, distinct: bool, mask: np.ndarray | None = None,
                     max_attempts: int = 64, fallback_seed: int = 0) -> np.ndarray:
  """Draws int32[R, k] items, none in `index` for its row's user.

  Args:
    users: int[R] user of each row.
    k: draws per row.
    index: the excluded (user, item) pairs.
    draw: `draw(rows, cols, attempt) -> int64[n]` items in 1..N for those slots.
    distinct: no repeated item within a row (relaxed for rows with fewer than k allowed
      items; rows of users who have every item stay 0).
    mask: optional bool[R, k]; slots where False are left 0 and not drawn.
    max_attempts: rounds of vectorised redraws before the exact per-row fallback.
    fallback_seed: seeds the (rare) exact fallback.
  """
  users = np.asarray(users, np.int64)
  r_count = users.shape[0]
  if index.dense is None and index.user_ptr is not None and r_count < index.num_users // 4:
    index = index.restrict(users)
  out = np.zeros((r_count, k), np.int64)
  if mask is None:
    mask = np.ones((r_count, k), bool)
  available = index.num_items - index.sizes[users]
  # A user who has every item has no negative: its slots stay 0 (padding).
  mask = mask & (available > 0)[:, None]
  row_distinct = distinct & (available >= mask.sum(axis=1))
  rows, cols = np.nonzero(mask)
  out[rows, cols] = draw(rows, cols, 0)
  any_distinct = bool(row_distinct.any())
  for attempt in range(1, max_attempts + 1):
    # Only fresh draws can collide with the excluded set; a fresh draw can also turn a
    # later column of its row into a duplicate, so duplicates are rechecked row-wide.
    bad = index.contains(users[rows], out[rows, cols])
    rows, cols = rows[bad], cols[bad]
    if any_distinct:
      dup = _dup_in_row(np.where(mask, out, -np.arange(k)[None, :] - 1))
      dup &= row_distinct[:, None] & mask
      if dup.any():
        pending = np.zeros((r_count, k), bool)
        pending[rows, cols] = True
        rows, cols = np.nonzero(pending | dup)
    if rows.size == 0:
      return out.astype(np.int32)
    if attempt < max_attempts:
      out[rows, cols] = draw(rows, cols, attempt)
  # Exact fallback for the few rows still colliding (users with nearly every item).
  rng = np.random.Generator(np.random.Philox(key=[fallback_seed, 0x5EED]))
  for r in np.unique(rows):
    u = int(users[r])
    allowed = index.allowed(u)
    slots = np.nonzero(mask[r])[0]
    replace = not row_distinct[r]
    out[r, slots] = rng.choice(allowed, size=slots.size, replace=replace)
  return out.astype(np.int32)


def hashed_draw(num_items: int, seed: int, epoch: int, row_ids: np.ndarray,
                stream: int = 0) -> DrawFn:
  """A `DrawFn` keyed by (stream, seed, epoch, row_ids[row], col, attempt)."""
  base = hash_u64(stream, seed, epoch)       # the scalar parts, mixed once
  with np.errstate(over="ignore"):
    row_h = _mix(base ^ (np.asarray(row_ids, np.int64).astype(np.uint64) * _GOLDEN))

  def draw(rows, cols, attempt):
    # slot id = (col, attempt) packed into one word; one array mix per draw.
    slot = (np.asarray(cols, np.int64) | (np.int64(attempt) << 32)).astype(np.uint64)
    with np.errstate(over="ignore"):
      h = _mix(row_h[rows] ^ (slot * _GOLDEN + _OFFSET))
    return _to_items(h, num_items)
  return draw


def generator_draw(num_items: int, rng: np.random.Generator) -> DrawFn:
  """A `DrawFn` that takes the next numbers from a seeded generator."""
  def draw(rows, cols, attempt):
    del cols, attempt
    return rng.integers(1, num_items + 1, size=rows.shape[0])
  return draw
