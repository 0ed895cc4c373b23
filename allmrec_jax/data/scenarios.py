"""Evaluation scenarios of the paper, derived deterministically from a `RecDataset`.

- cold / warm items: bottom / top `fraction` (35%) of items by interaction count, and the
  test users whose target is one of them;
- cold users: users with exactly 3 interactions, never in any training data (Amazon: the
  ones the >=k filter removed, stored with the dataset; MovieLens, where every user has
  >= 20: a seeded held-out set of users cut to their first 3 interactions, removed from
  the training dataset that this function returns);
- few-shot: a seeded subset of K training users;
- cross-domain (MovieLens): two datasets over disjoint genre groups, so transfer from one
  to the other can be measured offline.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from allmrec_jax.data import candidates as candidates_lib
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import pipelines
from allmrec_jax.data import sampling

# MovieLens genre groups of the cross-domain split (every ML-100K genre but "unknown").
GENRES_A = ("Action", "Adventure", "Crime", "Film-Noir", "Horror", "Mystery", "Sci-Fi",
            "Thriller", "War", "Western")
GENRES_B = ("Animation", "Children's", "Comedy", "Documentary", "Drama", "Fantasy",
            "Musical", "Romance")


# ---------------------------------------------------------------------- cold / warm items
def cold_warm_items(ds: dataset_lib.RecDataset, fraction: float = 0.35
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(int32[Nc] cold items, int32[Nw] warm items), each sorted ascending.

  Items ranked by interaction count (ties by id); cold = the bottom floor(fraction * N),
  warm = the top floor(fraction * N).
  """
  if not 0 < fraction <= 0.5:
    raise ValueError(f"cold_fraction must be in (0, 0.5], got {fraction}")
  n = ds.num_items
  order = np.argsort(ds.item_counts[1:], kind="stable") + 1
  m = int(np.floor(fraction * n))
  return (np.sort(order[:m]).astype(np.int32), np.sort(order[n - m:]).astype(np.int32))


def cold_warm_users(ds: dataset_lib.RecDataset, split: str = "test",
                    fraction: float = 0.35) -> dict[str, np.ndarray]:
  """{"cold": int32[] users whose `split` target is a cold item, "warm": int32[] ...}."""
  cold, warm = cold_warm_items(ds, fraction)
  users = ds.eval_users(split)
  t = ds.targets(split)[users]
  return {"cold": users[np.isin(t, cold)], "warm": users[np.isin(t, warm)]}


# ---------------------------------------------------------------------- cold users
@dataclasses.dataclass(frozen=True, eq=False)
class ColdUserSplit:
  """Cold users and the dataset every model trains on (which never contains them).

  Attributes:
    train: the RecDataset to train and evaluate warm users on.
    items: int32[Uc, 3] each cold user's 3 items, chronological: 2 history + 1 target.
    candidates: int32[Uc, 20] column 0 = target, 19 distinct negatives outside the 3.
    held_out_users: int32[Uc] their ids in the original dataset (MovieLens), or [] where
      they came from the raw data (Amazon).
  """
  train: dataset_lib.RecDataset
  items: np.ndarray
  candidates: np.ndarray
  held_out_users: np.ndarray

  @property
  def num_users(self) -> int:
    return int(self.items.shape[0])

  def eval_arrays(self, *, maxlen: int, num_history: int = 10,
                  shuffle_seed: int | None = None) -> dict[str, np.ndarray]:
    """{user int32[Uc] (row in this cold set), seq int32[Uc, maxlen], history
    int32[Uc, H] (left-padded), target int32[Uc], candidates int32[Uc, 20] (column 0 = the
    target unless `shuffle_seed` shuffles them), target_col int32[Uc]}."""
    n = self.num_users
    hist = self.items[:, :2]
    seq = np.zeros((n, maxlen), np.int32)
    seq[:, -min(2, maxlen):] = hist[:, -min(2, maxlen):]
    history = np.zeros((n, num_history), np.int32)
    history[:, -min(2, num_history):] = hist[:, -min(2, num_history):]
    cands = self.candidates
    target_col = np.zeros(n, np.int32)
    if shuffle_seed is not None:
      cands, target_col = pipelines.shuffle_candidates(
          cands, np.arange(n), seed=shuffle_seed, epoch=0,
          stream=pipelines.STREAM_EVAL_SHUFFLE)
    return {"user": np.arange(n, dtype=np.int32), "seq": seq, "history": history,
            "target": self.items[:, 2].astype(np.int32),
            "candidates": cands.astype(np.int32), "target_col": target_col}


def subset_users(ds: dataset_lib.RecDataset, keep: np.ndarray, *, name: str | None = None
                 ) -> dataset_lib.RecDataset:
  """A new RecDataset with only users `keep` (renumbered 0..len-1 in that order).

  Items keep their ids (counts recomputed); evaluation negatives are redrawn with the
  same candidate seed.
  """
  keep = np.asarray(keep, np.int64)
  starts, ends = ds.seq_offsets[:-1][keep], ds.seq_offsets[1:][keep]
  idx, _ = sampling.ranges_to_index(starts, ends)
  offsets = np.zeros(keep.size + 1, np.int64)
  np.cumsum(ends - starts, out=offsets[1:])
  manifest = dict(ds.manifest)
  manifest["derived_from"] = ds.name
  return dataset_lib.build_dataset(
      name=name or ds.name, domain=ds.domain, seq_offsets=offsets,
      seq_items=ds.seq_items[idx], num_items=ds.num_items, titles=ds.titles,
      descriptions=ds.descriptions, genres=ds.genres,
      candidate_seed=int(ds.manifest.get("candidate_seed", 2024)), manifest=manifest,
      item_ids=ds.item_ids, cold_user_items=ds.cold_user_items)


def _cold_candidates(items3: np.ndarray, num_items: int, seed: int) -> np.ndarray:
  n = items3.shape[0]
  index = sampling.ExclusionIndex(np.repeat(np.arange(n), 3), items3.reshape(-1), n,
                                  num_items)
  negs = candidates_lib.sample_user_negatives(np.arange(n), 19, index, seed, tag=11)
  return np.concatenate([items3[:, 2:3], negs], axis=1).astype(np.int32)


def cold_user_split(ds: dataset_lib.RecDataset, *, num_users: int = 100, seed: int = 0
                    ) -> ColdUserSplit:
  """The cold-user scenario (see module docstring).

  Args:
    ds: the processed dataset.
    num_users: MovieLens: how many users to hold out; Amazon (raw cold users stored with
      the dataset): at most this many of them are used (a seeded subset), 0 = all.
    seed: chooses the held-out users / the subset and the candidates.
  """
  rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0xC01D])))
  if ds.cold_user_items.shape[0] > 0:
    items = ds.cold_user_items
    if num_users and items.shape[0] > num_users:
      items = items[np.sort(rng.choice(items.shape[0], num_users, replace=False))]
    return ColdUserSplit(ds, items.astype(np.int32),
                         _cold_candidates(items, ds.num_items, seed),
                         np.zeros(0, np.int32))
  eligible = np.nonzero(ds.seq_lengths >= 3)[0]
  if num_users <= 0 or num_users >= eligible.size:
    raise ValueError(f"{ds.name}: num_cold_users={num_users} must be in "
                     f"[1, {eligible.size - 1}]")
  held = np.sort(rng.choice(eligible, num_users, replace=False))
  items = np.stack([ds.sequence(int(u))[:3] for u in held]).astype(np.int32)
  keep = np.setdiff1d(np.arange(ds.num_users), held)
  train = subset_users(ds, keep, name=f"{ds.name}-coldusers{num_users}-s{seed}")
  return ColdUserSplit(train, items, _cold_candidates(items, ds.num_items, seed),
                       held.astype(np.int32))


# ---------------------------------------------------------------------- few-shot
def few_shot_users(ds: dataset_lib.RecDataset, k: int, seed: int = 0) -> np.ndarray:
  """int32[K] sorted: K distinct users with >= 2 training items, seeded.

  Pass as `users=` to the training pipelines.
  """
  starts, ends = ds.train_bounds()
  eligible = np.nonzero((ends - starts) >= 2)[0]
  if not 0 < k <= eligible.size:
    raise ValueError(f"few-shot K={k} must be in [1, {eligible.size}] for {ds.name}")
  rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0xF5, k])))
  return np.sort(rng.choice(eligible, k, replace=False)).astype(np.int32)


# ---------------------------------------------------------------------- cross-domain
def genre_domain_items(ds: dataset_lib.RecDataset, genres: tuple[str, ...],
                       other: tuple[str, ...]) -> np.ndarray:
  """int32[] items with at least one genre in `genres` and none in `other`."""
  g, o = set(genres), set(other)
  return np.array([i for i in range(1, ds.num_items + 1)
                   if (s := set(ds.genres[i])) & g and not s & o], np.int32)


def restrict_items(ds: dataset_lib.RecDataset, items: np.ndarray, *, name: str,
                   min_user_items: int = 3) -> dataset_lib.RecDataset:
  """A RecDataset over `items` only (renumbered 1..len in ascending old id).

  Each user's sequence keeps its in-domain items in order; users with fewer than
  `min_user_items` of them are dropped. `item_ids` keep the raw ids.
  """
  items = np.unique(np.asarray(items, np.int64))
  new_of_old = np.zeros(ds.num_items + 1, np.int64)
  new_of_old[items] = np.arange(1, items.size + 1)
  mapped = new_of_old[ds.seq_items]
  user_of = np.repeat(np.arange(ds.num_users), ds.seq_lengths)
  inside = mapped > 0
  per_user = np.bincount(user_of[inside], minlength=ds.num_users)
  keep_user = per_user >= min_user_items
  sel = inside & keep_user[user_of]
  kept_users = np.nonzero(keep_user)[0]
  offsets = np.zeros(kept_users.size + 1, np.int64)
  np.cumsum(per_user[kept_users], out=offsets[1:])
  if offsets[-1] == 0:
    raise ValueError(f"{name}: no user has >= {min_user_items} items in this domain")
  ids = list(ds.item_ids) if ds.item_ids else [str(i) for i in range(ds.num_items + 1)]
  take = [0] + items.tolist()
  manifest = {"derived_from": ds.name, "options": ds.manifest.get("options", {}),
              "sources": ds.manifest.get("sources", {}),
              "candidate_seed": ds.manifest.get("candidate_seed", 2024)}
  return dataset_lib.build_dataset(
      name=name, domain=ds.domain, seq_offsets=offsets, seq_items=mapped[sel],
      num_items=items.size, titles=[ds.titles[i] if i else "" for i in take],
      descriptions=[ds.descriptions[i] if i else "" for i in take],
      genres=[list(ds.genres[i]) if i else [] for i in take],
      candidate_seed=int(manifest["candidate_seed"]), manifest=manifest,
      item_ids=tuple(ids[i] if i else "" for i in take))


def cross_domain_split(ds: dataset_lib.RecDataset, genres_a: tuple[str, ...] = GENRES_A,
                       genres_b: tuple[str, ...] = GENRES_B, *, min_user_items: int = 3
                       ) -> tuple[dataset_lib.RecDataset, dataset_lib.RecDataset]:
  """(source, target): datasets over two disjoint genre groups of `ds`.

  An item belongs to group A when its genres meet `genres_a` and not `genres_b` (and
  vice versa); items with genres in both groups or in neither are left out, so the two
  item sets are disjoint. Train on the source, infer on the target.
  """
  if set(genres_a) & set(genres_b):
    raise ValueError(f"genre groups overlap: {sorted(set(genres_a) & set(genres_b))}")
  a = genre_domain_items(ds, genres_a, genres_b)
  b = genre_domain_items(ds, genres_b, genres_a)
  if a.size == 0 or b.size == 0:
    raise ValueError(f"{ds.name}: a genre group has no item (does the dataset have "
                     "genres?)")
  return (restrict_items(ds, a, name=f"{ds.name}-xd-A", min_user_items=min_user_items),
          restrict_items(ds, b, name=f"{ds.name}-xd-B", min_user_items=min_user_items))
