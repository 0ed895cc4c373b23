"""The paper's language-generation task, scored: which genres does a generated answer name?

The prompt is A-LLMRec's genre question ("This user has watched ... in the past. Specify
the genres this user would enjoy watching.", `PromptBuilder.build(task="genre")`). An
answer is scored against the genres of the user's held-out interactions (the validation
and test items, which no prompt shows):

  named(answer)  = the dataset's genre names the answer mentions (whole words,
                   case-insensitive, with the usual spellings: "sci-fi" / "science
                   fiction", "children" / "kids", "noir", "romantic", "animated", plurals)
  precision      = |named & held-out genres| / |named|   (0 when nothing is named)
  recall         = |named & held-out genres| / |held-out genres|

averaged over users. `history_genres_answer` gives the non-LLM reference: the k genres most
frequent in the user's prompt history, written as an answer.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

import numpy as np

# Extra spellings of MovieLens genre names (the names themselves always match).
ALIASES = {
    "Sci-Fi": ("science fiction", "sci fi", "scifi", "science-fiction"),
    "Children's": ("children", "childrens", "kids", "kid"),
    "Film-Noir": ("film noir", "noir"),
    "Romance": ("romantic", "romances"),
    "Animation": ("animated", "animations"),
    "Comedy": ("comedies", "comedic"),
    "Drama": ("dramas", "dramatic"),
    "Thriller": ("thrillers",),
    "Western": ("westerns",),
    "Mystery": ("mysteries",),
    "Musical": ("musicals",),
    "Documentary": ("documentaries",),
    "Adventure": ("adventures",),
    "Horror": ("horrors",),
    "Fantasy": ("fantasies",),
}


def genre_vocabulary(genres: Sequence[Sequence[str]]) -> list[str]:
  """The dataset's genre names (MovieLens' "unknown" left out)."""
  return sorted({g for gs in genres for g in gs if g and g.lower() != "unknown"})


def _patterns(vocabulary: Sequence[str]) -> dict[str, re.Pattern]:
  out = {}
  for g in vocabulary:
    forms = {g.lower(), *(a.lower() for a in ALIASES.get(g, ()))}
    alt = "|".join(sorted((re.escape(f) for f in forms), key=len, reverse=True))
    out[g] = re.compile(rf"(?<![\w-])(?:{alt})(?![\w-])", re.IGNORECASE)
  return out


def named_genres(text: str, vocabulary: Sequence[str]) -> set[str]:
  """The genre names of `vocabulary` that `text` mentions."""
  return {g for g, p in _patterns(vocabulary).items() if p.search(text)}


def held_out_genres(ds, users: np.ndarray) -> list[set[str]]:
  """Per user: the genres of their validation and test items."""
  vocab = set(genre_vocabulary(ds.genres))
  out = []
  for u in users:
    items = [i for i in (ds.valid_item(int(u)), ds.test_item(int(u))) if i > 0]
    out.append({g for i in items for g in ds.genres[i] if g in vocab})
  return out


def history_genres_answer(ds, history: np.ndarray, k: int = 3) -> list[str]:
  """Per user: "g1, g2, g3", the k genres most frequent in the prompt history (ties by the
  genre's overall frequency), the reference answer without an LLM."""
  overall = collections.Counter(g for gs in ds.genres[1:] for g in gs)
  vocab = set(genre_vocabulary(ds.genres))
  out = []
  for row in history:
    c = collections.Counter(g for i in row if i > 0 for g in ds.genres[int(i)] if g in vocab)
    top = sorted(c, key=lambda g: (-c[g], -overall[g], g))[:k]
    out.append(", ".join(top))
  return out


def genre_metrics(texts: Sequence[str], reference: Sequence[set[str]], vocabulary:
                  Sequence[str], prefix: str) -> dict[str, float]:
  """Mean precision / recall of the named genres, and the mean number named."""
  if len(texts) != len(reference):
    raise ValueError(f"genre_metrics: {len(texts)} answers for {len(reference)} users")
  pats = _patterns(vocabulary)
  prec, rec, count = [], [], []
  for text, ref in zip(texts, reference):
    named = {g for g, p in pats.items() if p.search(text)}
    hit = len(named & ref)
    prec.append(hit / len(named) if named else 0.0)
    rec.append(hit / len(ref) if ref else 0.0)
    count.append(len(named))
  return {f"{prefix}precision": float(np.mean(prec)) if prec else 0.0,
          f"{prefix}recall": float(np.mean(rec)) if rec else 0.0,
          f"{prefix}named": float(np.mean(count)) if count else 0.0}
