"""Readers for Amazon Reviews 2018 and 2023 (gzip JSON lines, streamed).

2018: `{Category}.json.gz` (reviewerID, asin, overall, unixReviewTime) and
`meta_{Category}.json.gz` (asin, title, description, category). Older metadata dumps
hold Python-literal dicts (`{'asin': ...}`); those lines are parsed with
`ast.literal_eval` (literals only, never eval).
2023: `{Category}.jsonl.gz` (user_id, parent_asin, rating, timestamp in ms) and
`meta_{Category}.jsonl.gz` (parent_asin, title, description, categories).

Metadata is read first (item id -> title / description / categories), then the reviews
stream line by line. Malformed lines, missing fields, non-UTF-8 bytes and reviews of
items the metadata does not describe are skipped and counted per reason (or, strict,
raise with file:line). Duplicates are dropped later, in preprocessing.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
from math import isfinite
import os
import zlib

from allmrec_jax.data import raw

_FORMATS = {
    "amazon2018": dict(reviews="{c}.json.gz", meta="meta_{c}.json.gz", user="reviewerID",
                       item="asin", rating="overall", time="unixReviewTime",
                       meta_item="asin", genres="category", time_scale=1.0),
    "amazon2023": dict(reviews="{c}.jsonl.gz", meta="meta_{c}.jsonl.gz", user="user_id",
                       item="parent_asin", rating="rating", time="timestamp",
                       meta_item="parent_asin", genres="categories", time_scale=1e-3),
}


def _resolve(directory, pattern, category, what) -> str:
  p = os.path.join(directory, pattern.format(c=category))
  if os.path.isfile(p):
    return p
  if p.endswith(".gz") and os.path.isfile(p[:-3]):
    return p[:-3]
  raise raw.DataFormatError(f"{p}: file not found (expected {what})")


def _open_binary(path):
  if path.endswith(".gz"):
    return io.BufferedReader(gzip.open(path, "rb"), buffer_size=1 << 20)
  return open(path, "rb")


def _lines(path):
  """Yields (lineno, bytes) of a gzip (or plain) file; damaged gzip -> one-line error."""
  f = _open_binary(path)
  lineno = 0
  try:
    with f:
      for lineno, line in enumerate(f, start=1):
        yield lineno, line
  except (gzip.BadGzipFile, OSError, EOFError, zlib.error) as e:
    raise raw.DataFormatError(f"{path}:{lineno + 1}: unreadable gzip data ({e})") from None


def _parse(line: bytes, path, lineno, skipped: raw.SkipCounter, loose: bool,
           prefix: str = ""):
  """dict or None (skipped, reason `prefix` + ...). `loose` also accepts Python-literal
  dict lines."""
  try:
    d = json.loads(line)
  except UnicodeDecodeError:
    skipped.skip(prefix + "non_utf8", path, lineno)
    return None
  except ValueError:
    d = None
    if loose:
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError:
        skipped.skip(prefix + "non_utf8", path, lineno)
        return None
      text = text.strip()
      if text.startswith("{"):
        try:
          d = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
          d = None
    if d is None:
      if not line.strip():
        return None
      skipped.skip(prefix + "malformed_line", path, lineno)
      return None
  if not isinstance(d, dict):
    skipped.skip(prefix + "malformed_line", path, lineno, "not an object")
    return None
  return d


def _genres(x) -> list[str]:
  if isinstance(x, list):
    out = []
    for g in x:
      if isinstance(g, str):
        out.append(raw.clean_text(g))
      elif isinstance(g, list):   # 2014-style nested category lists
        out.extend(raw.clean_text(s) for s in g if isinstance(s, str))
    return [g for g in out if g]
  return []


def read_meta(path, fmt: dict, skipped: raw.SkipCounter, description_mode: str
              ) -> dict[str, raw.ItemText]:
  out: dict[str, raw.ItemText] = {}
  for lineno, line in _lines(path):
    d = _parse(line, path, lineno, skipped, loose=True, prefix="meta_")
    if d is None:
      continue
    iid = d.get(fmt["meta_item"])
    if not isinstance(iid, str) or not iid:
      skipped.skip("meta_missing_field", path, lineno, fmt["meta_item"])
      continue
    if iid in out:
      skipped.skip("meta_duplicate", path, lineno, iid)
      continue
    title = d.get("title")
    if title is not None and not isinstance(title, str):
      # A JSON object/number/list is no title: counted, and the item keeps its interactions
      # under the no-title fallback (prepare counts that too).
      skipped.skip("meta_bad_title", path, lineno, f"title is a {type(title).__name__}")
      title = None
    out[iid] = raw.ItemText(raw.clean_text(title),
                            raw.pick_description(d.get("description"), description_mode),
                            _genres(d.get(fmt["genres"])))
  if not out:
    raise raw.DataFormatError(f"{path}: no item metadata read (expected JSON lines with "
                              f"'{fmt['meta_item']}')")
  return out


def _read(kind: str, directory, category: str, *, strict: bool, description_mode: str,
          skip_unknown_items: bool) -> raw.RawInteractions:
  fmt = _FORMATS[kind]
  reviews = _resolve(directory, fmt["reviews"], category, f"{kind} reviews (JSON lines)")
  meta = _resolve(directory, fmt["meta"], category, f"{kind} metadata (JSON lines)")
  skipped = raw.SkipCounter(strict)
  item_text = read_meta(meta, fmt, skipped, description_mode)
  b = raw.InteractionBuilder()
  ku, ki, kr, kt = fmt["user"], fmt["item"], fmt["rating"], fmt["time"]
  scale = fmt["time_scale"]
  nan = float("nan")
  # Hot loop (millions of lines): the C JSON scanner on decoded text, the id maps and
  # arrays of the builder as locals.
  scan = json.JSONDecoder().scan_once
  user_map, item_map = b.user_map, b.item_map
  add_u, add_i = b.users.append, b.items.append
  add_t, add_r, add_l = b.timestamps.append, b.ratings.append, b.linenos.append
  lineno = 0
  try:
    with _open_binary(reviews) as f:
      for lineno, line in enumerate(f, start=1):
        try:
          text = line.decode("utf-8")
        except UnicodeDecodeError:
          skipped.skip("non_utf8", reviews, lineno)
          continue
        try:
          d, end = scan(text, 0)
          if end < len(text) and not text[end:].isspace():
            raise ValueError("trailing data")
        except (StopIteration, ValueError):
          if text.strip():
            try:                      # leading whitespace or other oddities
              d = json.loads(text)
            except ValueError:
              skipped.skip("malformed_line", reviews, lineno)
              continue
          else:
            continue
        try:
          u, i, t = d[ku], d[ki], d[kt]
        except (KeyError, TypeError, IndexError):
          if not isinstance(d, dict):
            skipped.skip("malformed_line", reviews, lineno, "not an object")
          else:
            skipped.skip("missing_field", reviews, lineno)
          continue
        if not (isinstance(u, str) and isinstance(i, str) and u and i):
          skipped.skip("missing_field", reviews, lineno, "user/item id")
          continue
        try:
          t = float(t) * scale
          if not isfinite(t):
            raise ValueError("non-finite timestamp")
          r = d.get(kr)
          r = nan if r is None else float(r)
        except (TypeError, ValueError):
          skipped.skip("malformed_number", reviews, lineno)
          continue
        if skip_unknown_items and i not in item_text:
          skipped.skip("unknown_item", reviews, lineno, i)
          continue
        uid = user_map.get(u)
        if uid is None:
          uid = user_map[u] = len(user_map)
        iid = item_map.get(i)
        if iid is None:
          iid = item_map[i] = len(item_map)
        add_u(uid)
        add_i(iid)
        add_t(t)
        add_r(r)
        add_l(lineno)
  except (gzip.BadGzipFile, OSError, EOFError, zlib.error) as e:
    raise raw.DataFormatError(
        f"{reviews}:{lineno + 1}: unreadable gzip data ({e})") from None
  if len(b) == 0:
    raise raw.DataFormatError(f"{reviews}: no valid review read (expected JSON lines with "
                              f"'{ku}', '{ki}', '{kt}')")
  sources = {reviews: raw.sha256_file(reviews), meta: raw.sha256_file(meta)}
  return b.finish(item_text, skipped, sources, reviews)


def read_amazon2018(directory, category: str, *, strict: bool = False,
                    description_mode: str = "first", skip_unknown_items: bool = True
                    ) -> raw.RawInteractions:
  return _read("amazon2018", directory, category, strict=strict,
               description_mode=description_mode, skip_unknown_items=skip_unknown_items)


def read_amazon2023(directory, category: str, *, strict: bool = False,
                    description_mode: str = "first", skip_unknown_items: bool = True
                    ) -> raw.RawInteractions:
  return _read("amazon2023", directory, category, strict=strict,
               description_mode=description_mode, skip_unknown_items=skip_unknown_items)
