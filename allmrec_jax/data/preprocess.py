"""Raw interactions -> chronological per-user sequences, as the paper's code does.

1. duplicate (user, item) pairs: later occurrences dropped (counted);
2. optional rating threshold (keep rating >= t);
3. the >=k filter on the counts of that raw data, one pass (an interaction survives when
   its user AND its item have >= k interactions); optionally iterated to a fixed point;
4. users / items renumbered in order of first appearance among surviving lines (users
   0..U-1, items 1..N);
5. each user's items sorted by timestamp, stable (file order breaks ties).
Users with exactly 3 interactions before the filter (removed when k > 3) are kept aside as
cold users where all 3 of their items survive.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from allmrec_jax.data import raw


@dataclasses.dataclass
class Sequences:
  seq_offsets: np.ndarray        # int64[U+1]
  seq_items: np.ndarray          # int32[nnz], items 1..N
  item_keys: list[str]           # len N+1, raw id of each new item id ("" at 0)
  user_keys: list[str]           # len U
  cold_user_items: np.ndarray    # int32[Uc, 3]
  stats: dict


def _first_occurrence(keys: np.ndarray) -> np.ndarray:
  """bool[n]: True at the first occurrence of each key value."""
  _, first = np.unique(keys, return_index=True)
  mask = np.zeros(keys.shape, bool)
  mask[first] = True
  return mask


def _renumber(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(new ids 0..K-1 by first appearance, old code of each new id)."""
  uniq, first, inv = np.unique(codes, return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")      # old codes in first-appearance order
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  return rank[inv], uniq[order]


def make_sequences(r: raw.RawInteractions, *, min_count: int = 5,
                   rating_threshold: float = 0.0, iterative_kcore: bool = False
                   ) -> Sequences:
  users, items, ts, ratings = r.users, r.items, r.timestamps, r.ratings
  stats = {"raw_interactions": int(users.size)}
  num_items_raw = len(r.item_keys)
  # 1. duplicates
  keep = _first_occurrence(users * max(num_items_raw, 1) + items)
  n_dup = int((~keep).sum())
  if n_dup:
    if r.skipped.strict:
      first = int(np.argmin(keep))
      line = int(r.linenos[first]) if r.linenos is not None and r.linenos.size else 0
      raise raw.DataFormatError(
          f"{r.interactions_path or 'input'}:{line}: duplicate (user "
          f"{r.user_keys[users[first]]}, item {r.item_keys[items[first]]})")
    r.skipped.note("duplicate", n_dup)
  # 2. rating threshold
  if rating_threshold and rating_threshold > 0:
    below = ~(ratings >= rating_threshold)      # NaN ratings fail the threshold
    stats["below_rating_threshold"] = int((below & keep).sum())
    keep &= ~below
  users, items, ts = users[keep], items[keep], ts[keep]
  stats["after_rating_and_dedup"] = int(users.size)
  ucount = np.bincount(users, minlength=len(r.user_keys))
  icount = np.bincount(items, minlength=num_items_raw)
  # 3. >=k filter
  mask = (ucount[users] >= min_count) & (icount[items] >= min_count)
  rounds = 1
  while iterative_kcore:
    uc = np.bincount(users[mask], minlength=len(r.user_keys))
    ic = np.bincount(items[mask], minlength=num_items_raw)
    new = mask & (uc[users] >= min_count) & (ic[items] >= min_count)
    if new.sum() == mask.sum():
      break
    mask, rounds = new, rounds + 1
  stats["kcore_rounds"] = rounds
  # cold users: exactly 3 interactions, none of which survived the filter
  kept_per_user = np.bincount(users[mask], minlength=len(r.user_keys))
  cold_mask = ((ucount == 3) & (kept_per_user == 0))[users]
  fu, fi, ft = users[mask], items[mask], ts[mask]
  if fu.size == 0:
    raise raw.DataFormatError(
        f"{', '.join(r.sources) or 'input'}: no interaction left after the >={min_count} "
        f"filter (rating_threshold={rating_threshold}); nothing to train on")
  # 4. renumber by first appearance among kept lines
  new_u, old_u = _renumber(fu)
  new_i0, old_i = _renumber(fi)
  new_i = new_i0 + 1
  num_users, num_items = old_u.size, old_i.size
  # 5. chronological, stable
  order = np.lexsort((ft, new_u))
  seq_items = new_i[order].astype(np.int32)
  counts = np.bincount(new_u, minlength=num_users)
  offsets = np.zeros(num_users + 1, np.int64)
  np.cumsum(counts, out=offsets[1:])
  # cold users with all 3 items among the kept items
  item_new_of_old = np.zeros(max(num_items_raw, 1), np.int64)
  item_new_of_old[old_i] = np.arange(1, num_items + 1)
  cu, ci, ct = users[cold_mask], items[cold_mask], ts[cold_mask]
  cold = np.zeros((0, 3), np.int32)
  if cu.size:
    o = np.lexsort((ct, cu))
    cu, ci = cu[o], item_new_of_old[ci[o]]
    ci3 = ci.reshape(-1, 3)
    ok = np.all(ci3 > 0, axis=1)
    stats["cold_users_with_unknown_items"] = int((~ok).sum())
    cold = ci3[ok].astype(np.int32)
  item_keys = [""] + [r.item_keys[k] for k in old_i]
  user_keys = [r.user_keys[k] for k in old_u]
  stats.update(users=int(num_users), items=int(num_items), interactions=int(fu.size))
  return Sequences(offsets, seq_items, item_keys, user_keys, cold, stats)
