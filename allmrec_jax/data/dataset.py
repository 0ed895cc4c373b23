"""`RecDataset`: a processed dataset (chronological sequences, item text, fixed candidates).

Users are 0..U-1, items 1..N (0 = padding). Leave-one-out: the last item of a user is the
test target, the second to last the validation target, the rest is training data. Users
with fewer than 3 items keep everything in training and have no validation/test target.

On disk (`save_dataset` / `load_dataset`): `arrays.npz` (numpy arrays, read with
allow_pickle=False) and `dataset.json` (scalars, item text, manifest). No pickle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

import numpy as np

ARRAYS_FILE = "arrays.npz"
JSON_FILE = "dataset.json"
FORMAT_VERSION = 1
SPLITS = ("valid", "test")
NEG_KINDS = ("neg19", "neg100")


def left_pad(starts: np.ndarray, ends: np.ndarray, items: np.ndarray,
             maxlen: int) -> np.ndarray:
  """int32[R, maxlen]: the last `maxlen` items of `items[starts[r]:ends[r]]`, left-padded.

  Vectorised gather: column j holds items[ends - maxlen + j] where that index >= starts.
  """
  starts = np.asarray(starts, np.int64)[:, None]
  ends = np.asarray(ends, np.int64)[:, None]
  idx = ends - maxlen + np.arange(maxlen, dtype=np.int64)[None, :]
  valid = (idx >= starts) & (idx < ends)
  if items.size == 0:
    return np.zeros(idx.shape, np.int32)
  out = items[np.clip(idx, 0, items.size - 1)]
  return np.where(valid, out, 0).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class RecDataset:
  """A processed recommendation dataset (see module docstring)."""
  name: str                      # "ml-100k", "amazon2018-Beauty", ...
  domain: str                    # "movies" | "games" | "items"  (prompt wording)
  num_users: int                 # U; users are 0..U-1 in every array
  num_items: int                 # N; items are 1..N, 0 = padding
  seq_offsets: np.ndarray        # int64[U+1]
  seq_items: np.ndarray          # int32[nnz]; user u: seq_items[seq_offsets[u]:seq_offsets[u+1]]
  titles: list[str]              # len N+1, titles[0] = ""
  descriptions: list[str]        # len N+1 ("" where none)
  genres: list[list[str]]        # len N+1 (empty lists where the source has none)
  item_counts: np.ndarray        # int64[N+1] interaction counts (after filtering)
  valid_neg19: np.ndarray        # int32[U, 19] fixed negatives, never in the user's history
  test_neg19: np.ndarray         # int32[U, 19]
  valid_neg100: np.ndarray       # int32[U, 100]
  test_neg100: np.ndarray        # int32[U, 100]
  manifest: dict                 # source hashes, options, statistics, skipped counts
  # Optional extras (defaults keep older constructors valid):
  item_ids: tuple[str, ...] = ()  # len N+1 raw item id of each item ("" at 0), if known
  cold_user_items: np.ndarray = dataclasses.field(  # int32[Uc, 3] chronological items of
      default_factory=lambda: np.zeros((0, 3), np.int32))  # raw users with exactly 3
  # interactions that the >=k filter removed (Amazon); never in any training data.

  # ------------------------------------------------------------------ per user
  @functools.cached_property
  def seq_lengths(self) -> np.ndarray:
    """int64[U] number of items per user."""
    return np.diff(self.seq_offsets)

  @property
  def has_target(self) -> np.ndarray:
    """bool[U]: users with >= 3 items (they have a validation and a test target)."""
    return self.seq_lengths >= 3

  @property
  def num_interactions(self) -> int:
    return int(self.seq_items.size)

  def sequence(self, u: int) -> np.ndarray:
    """int32[n] all items of user u, chronological."""
    return self.seq_items[self.seq_offsets[u]:self.seq_offsets[u + 1]]

  def train_items(self, u: int) -> np.ndarray:
    """int32[n-2] training items of user u (all items if the user has < 3)."""
    s = self.sequence(u)
    return s[:-2] if s.size >= 3 else s

  def valid_item(self, u: int) -> int:
    s = self.sequence(u)
    return int(s[-2]) if s.size >= 3 else 0

  def test_item(self, u: int) -> int:
    s = self.sequence(u)
    return int(s[-1]) if s.size >= 3 else 0

  def train_bounds(self) -> tuple[np.ndarray, np.ndarray]:
    """(int64[U] start, int64[U] end) of each user's training items in seq_items."""
    return self._train_bounds

  @functools.cached_property
  def _train_bounds(self) -> tuple[np.ndarray, np.ndarray]:
    starts = self.seq_offsets[:-1]
    lengths = self.seq_lengths
    ends = starts + np.where(lengths >= 3, lengths - 2, lengths)
    return starts, ends

  def input_bounds(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) int64[U] of the items given as input for `split`.

    "train"/"valid": the training items; "test": training items + the validation item
    (users without a target: all their items).
    """
    starts, ends = self.train_bounds()
    if split in ("train", "valid"):
      return starts, ends
    if split == "test":
      return starts, np.where(self.has_target, ends + 1, ends)
    raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")

  # ------------------------------------------------------------------ text
  def item_text(self, i: int) -> str:
    """'{title}, {description}', or the title alone where there is no description."""
    t, d = self.titles[i], self.descriptions[i]
    return f"{t}, {d}" if d else t

  # ------------------------------------------------------------------ evaluation arrays
  def eval_users(self, split: str) -> np.ndarray:
    """int32[Ue] ids of users with a `split` target."""
    _check_split(split)
    return np.nonzero(self.has_target)[0].astype(np.int32)

  def history_matrix(self, split: str, maxlen: int) -> np.ndarray:
    """int32[U, maxlen] left-padded input items for predicting the `split` target."""
    starts, ends = self.input_bounds(split)
    return left_pad(starts, ends, self.seq_items, maxlen)

  def targets(self, split: str) -> np.ndarray:
    """int32[U] the `split` target of each user (0 where the user has none)."""
    _check_split(split)
    ends = self.seq_offsets[1:] - (2 if split == "valid" else 1)
    t = self.seq_items[np.clip(ends, 0, max(self.seq_items.size - 1, 0))]
    return np.where(self.has_target, t, 0).astype(np.int32)

  def negatives(self, split: str, kind: str = "neg19") -> np.ndarray:
    """int32[U, k] the stored evaluation negatives."""
    _check_split(split)
    if kind not in NEG_KINDS:
      raise ValueError(f"kind must be one of {NEG_KINDS}, got {kind!r}")
    return getattr(self, f"{split}_{kind}")

  def candidates(self, split: str, kind: str = "neg19") -> np.ndarray:
    """int32[U, 1+k]: column 0 = the target, then the stored negatives."""
    return np.concatenate(
        [self.targets(split)[:, None], self.negatives(split, kind)], axis=1
    ).astype(np.int32)

  def statistics(self) -> dict:
    lengths = self.seq_lengths
    return {
        "users": int(self.num_users),
        "items": int(self.num_items),
        "interactions": int(self.num_interactions),
        "avg_seq_len": float(lengths.mean()) if lengths.size else 0.0,
        "density": float(self.num_interactions / max(1, self.num_users * self.num_items)),
        "cold_users": int(self.cold_user_items.shape[0]),
    }


def _check_split(split: str):
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# -------------------------------------------------------------------- build
def build_dataset(*, name: str, domain: str, seq_offsets: np.ndarray,
                  seq_items: np.ndarray, num_items: int, titles: list[str],
                  descriptions: list[str], genres: list[list[str]],
                  candidate_seed: int, manifest: dict | None = None,
                  item_ids: tuple[str, ...] = (),
                  cold_user_items: np.ndarray | None = None) -> RecDataset:
  """Assembles a RecDataset: counts items and draws the fixed evaluation negatives."""
  from allmrec_jax.data import candidates as candidates_lib  # pylint: disable=g-import-not-at-top
  seq_offsets = np.asarray(seq_offsets, np.int64)
  seq_items = np.asarray(seq_items, np.int32)
  num_users = len(seq_offsets) - 1
  if len(titles) != num_items + 1 or len(descriptions) != num_items + 1 or \
      len(genres) != num_items + 1:
    raise ValueError(f"{name}: titles/descriptions/genres must have N+1={num_items + 1} "
                     "entries")
  if seq_items.size and (seq_items.min() < 1 or seq_items.max() > num_items):
    raise ValueError(f"{name}: item ids must lie in 1..{num_items}")
  counts = np.bincount(seq_items, minlength=num_items + 1).astype(np.int64)
  negs = candidates_lib.make_eval_negatives(seq_offsets, seq_items, num_items,
                                            candidate_seed)
  if cold_user_items is None:
    cold_user_items = np.zeros((0, 3), np.int32)
  manifest = dict(manifest or {})
  ds = RecDataset(
      name=name, domain=domain, num_users=num_users, num_items=int(num_items),
      seq_offsets=seq_offsets, seq_items=seq_items, titles=list(titles),
      descriptions=list(descriptions), genres=[list(g) for g in genres],
      item_counts=counts, manifest=manifest, item_ids=tuple(item_ids),
      cold_user_items=np.asarray(cold_user_items, np.int32).reshape(-1, 3), **negs)
  manifest["statistics"] = ds.statistics()
  manifest.setdefault("candidate_seed", int(candidate_seed))
  return ds


# -------------------------------------------------------------------- save / load
_ARRAY_FIELDS = ("seq_offsets", "seq_items", "item_counts", "valid_neg19", "test_neg19",
                 "valid_neg100", "test_neg100", "cold_user_items")


def save_dataset(ds: RecDataset, path: str | os.PathLike) -> pathlib.Path:
  """Writes `ds` into folder `path` (arrays.npz + dataset.json); returns the folder."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  arrays = {f: np.asarray(getattr(ds, f)) for f in _ARRAY_FIELDS}
  np.savez(path / ARRAYS_FILE, **arrays)
  meta = {
      "format_version": FORMAT_VERSION,
      "name": ds.name, "domain": ds.domain,
      "num_users": int(ds.num_users), "num_items": int(ds.num_items),
      "titles": ds.titles, "descriptions": ds.descriptions, "genres": ds.genres,
      "item_ids": list(ds.item_ids), "manifest": ds.manifest,
  }
  with open(path / JSON_FILE, "w", encoding="utf-8") as f:
    json.dump(meta, f, ensure_ascii=False)
  return path


def load_dataset(path: str | os.PathLike) -> RecDataset:
  """Reads a folder written by `save_dataset`."""
  path = pathlib.Path(path)
  for fname in (ARRAYS_FILE, JSON_FILE):
    if not (path / fname).is_file():
      raise FileNotFoundError(f"{path / fname}: missing (not a processed dataset folder)")
  fix = ("delete the folder or prepare again with --overwrite (launch/prepare_data.py)")
  try:
    with open(path / JSON_FILE, encoding="utf-8") as f:
      meta = json.load(f)
    for key in ("name", "domain", "num_users", "num_items", "titles", "descriptions",
                "genres", "item_ids", "manifest"):
      if key not in meta:
        raise KeyError(key)
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path / JSON_FILE}: corrupt processed dataset "
                     f"({type(e).__name__}: {e}); {fix}") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path / JSON_FILE}: format_version {meta.get('format_version')} "
                     f"!= {FORMAT_VERSION}")
  try:
    with np.load(path / ARRAYS_FILE, allow_pickle=False) as z:
      arrays = {f: z[f] for f in _ARRAY_FIELDS}
  except Exception as e:  # pylint: disable=broad-except  (zip, zlib, npy-header errors)
    raise ValueError(f"{path / ARRAYS_FILE}: corrupt processed dataset "
                     f"({type(e).__name__}: {e}); {fix}") from None
  return RecDataset(
      name=meta["name"], domain=meta["domain"], num_users=meta["num_users"],
      num_items=meta["num_items"], titles=meta["titles"],
      descriptions=meta["descriptions"], genres=meta["genres"],
      item_ids=tuple(meta["item_ids"]), manifest=meta["manifest"], **arrays)
