"""What every raw reader returns: interactions in file order, item text, skip counts.

Readers stream their files line by line; memory grows only with the id maps and the
compact interaction arrays (`array.array`, 8 bytes per number).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
import html
import os

import numpy as np


class DataFormatError(ValueError):
  """A raw file is missing, empty or not in the expected format (one-line message)."""


class SkipCounter:
  """Counts skipped lines per reason; under `strict` the first one raises with file:line."""

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.counts: collections.Counter = collections.Counter()

  def skip(self, reason: str, path: str | os.PathLike, lineno: int, detail: str = ""):
    if self.strict:
      extra = f" ({detail})" if detail else ""
      raise DataFormatError(f"{path}:{lineno}: {reason}{extra}")
    self.counts[reason] += 1

  def note(self, reason: str, n: int = 1):
    """Counts something that is not an error (e.g. a text fallback)."""
    self.counts[reason] += n

  def as_dict(self) -> dict[str, int]:
    return {k: int(v) for k, v in sorted(self.counts.items())}


@dataclasses.dataclass
class ItemText:
  title: str
  description: str
  genres: list[str]


@dataclasses.dataclass
class RawInteractions:
  """Interactions in file order (before filtering).

  Attributes:
    users: int64[n] index into `user_keys`.
    items: int64[n] index into `item_keys`.
    timestamps: float64[n].
    ratings: float64[n] (NaN where the source has none).
    user_keys / item_keys: raw ids, in order of first appearance.
    item_text: raw item id -> ItemText (items the metadata describes).
    skipped: per-reason counts of skipped lines and fallbacks.
    sources: file path -> sha256.
    linenos: int64[n] line of each interaction in `interactions_path` (error messages).
    interactions_path: the file the interactions came from.
  """
  users: np.ndarray
  items: np.ndarray
  timestamps: np.ndarray
  ratings: np.ndarray
  user_keys: list[str]
  item_keys: list[str]
  item_text: dict[str, ItemText]
  skipped: SkipCounter
  sources: dict[str, str]
  linenos: np.ndarray | None = None
  interactions_path: str = ""


class InteractionBuilder:
  """Accumulates (user, item, time, rating) rows with compact id maps."""

  def __init__(self):
    self.user_map: dict[str, int] = {}
    self.item_map: dict[str, int] = {}
    self.users = array.array("q")
    self.items = array.array("q")
    self.timestamps = array.array("d")
    self.ratings = array.array("d")
    self.linenos = array.array("q")

  def add(self, user: str, item: str, timestamp: float, rating: float, lineno: int = 0):
    u = self.user_map.get(user)
    if u is None:
      u = self.user_map[user] = len(self.user_map)
    i = self.item_map.get(item)
    if i is None:
      i = self.item_map[item] = len(self.item_map)
    self.users.append(u)
    self.items.append(i)
    self.timestamps.append(timestamp)
    self.ratings.append(rating)
    self.linenos.append(lineno)

  def __len__(self):
    return len(self.users)

  def finish(self, item_text, skipped, sources, interactions_path: str = ""
             ) -> RawInteractions:
    return RawInteractions(
        users=np.frombuffer(self.users, np.int64).copy(),
        items=np.frombuffer(self.items, np.int64).copy(),
        timestamps=np.frombuffer(self.timestamps, np.float64).copy(),
        ratings=np.frombuffer(self.ratings, np.float64).copy(),
        user_keys=list(self.user_map), item_keys=list(self.item_map),
        item_text=item_text, skipped=skipped, sources=sources,
        linenos=np.frombuffer(self.linenos, np.int64).copy(),
        interactions_path=str(interactions_path))


def clean_text(x) -> str:
  """HTML-unescaped, whitespace-collapsed string ('' for None / non-strings)."""
  if x is None:
    return ""
  if not isinstance(x, str):
    x = str(x)
  return " ".join(html.unescape(x).split())


def pick_description(desc, mode: str) -> str:
  """Description text from a string or a list of strings.

  mode "first": the first entry (the paper's code); "join": all entries joined by spaces.
  """
  if desc is None:
    return ""
  if isinstance(desc, str):
    return clean_text(desc)
  if isinstance(desc, (list, tuple)):
    parts = [clean_text(d) for d in desc if isinstance(d, str)]
    parts = [p for p in parts if p]
    if not parts:
      return ""
    if mode == "first":
      return parts[0]
    if mode == "join":
      return " ".join(parts)
    raise ValueError(f"data.description_mode must be 'first' or 'join', got {mode!r}")
  return ""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while b := f.read(chunk):
      h.update(b)
  return h.hexdigest()


def require_file(path: str | os.PathLike, what: str):
  if not os.path.isfile(path):
    raise DataFormatError(f"{path}: file not found (expected {what})")
