"""Reader for RecBole atomic files (`{name}.inter` + `{name}.item`), e.g. MovieLens-100K.

`.inter`: tab-separated, header `user_id:token  item_id:token  rating:float
timestamp:float`. `.item`: header with `item_id:token` and a title column
(`movie_title`/`title`), optionally a genre column (`class`/`genre`/`categories`,
space-separated tokens) and a `description` column. Columns are found by name.
"""

from __future__ import annotations

import math
import os

from allmrec_jax.data import raw

_TITLE_COLS = ("movie_title", "title", "item_name", "name")
_GENRE_COLS = ("class", "genre", "genres", "categories")
_DESC_COLS = ("description", "desc")


def _header(line: str, path) -> dict[str, int]:
  cols = {}
  for j, field in enumerate(line.rstrip("\r\n").split("\t")):
    cols[field.split(":", 1)[0].strip()] = j
  if not cols:
    raise raw.DataFormatError(f"{path}: empty header (expected RecBole atomic columns)")
  return cols


def _open_lines(path):
  """Yields (lineno, text or None if not UTF-8) from a text file, binary-safe."""
  with open(path, "rb") as f:
    for lineno, b in enumerate(f, start=1):
      try:
        yield lineno, b.decode("utf-8")
      except UnicodeDecodeError:
        yield lineno, None


def _rows(lines, path, width: int, skipped: raw.SkipCounter, prefix: str = ""):
  """Yields (lineno, fields) of the tab-separated body; non-UTF-8 and wrongly sized lines
  are skipped and counted as `{prefix}non_utf8` / `{prefix}malformed_line`."""
  for lineno, text in lines:
    if text is None:
      skipped.skip(prefix + "non_utf8", path, lineno)
      continue
    text = text.rstrip("\r\n")
    if not text:
      continue
    f = text.split("\t")
    if len(f) != width:
      skipped.skip(prefix + "malformed_line", path, lineno,
                   f"{len(f)} fields, expected {width}")
      continue
    yield lineno, f


def read_item_file(path, skipped: raw.SkipCounter) -> dict[str, raw.ItemText]:
  """raw item id -> ItemText from a RecBole `.item` file."""
  raw.require_file(path, "a RecBole .item file")
  out: dict[str, raw.ItemText] = {}
  lines = _open_lines(path)
  first = next(lines, None)
  if first is None or first[1] is None:
    raise raw.DataFormatError(f"{path}: empty or unreadable header (expected item_id:token "
                              "and a title column)")
  cols = _header(first[1], path)
  if "item_id" not in cols:
    raise raw.DataFormatError(f"{path}: no item_id column in header {list(cols)}")
  ci = cols["item_id"]
  ct = next((cols[c] for c in _TITLE_COLS if c in cols), None)
  cg = next((cols[c] for c in _GENRE_COLS if c in cols), None)
  cd = next((cols[c] for c in _DESC_COLS if c in cols), None)
  for lineno, f in _rows(lines, path, len(cols), skipped, prefix="item_"):
    iid = f[ci].strip()
    if not iid:
      skipped.skip("item_missing_field", path, lineno, "item_id")
      continue
    if iid in out:
      skipped.skip("item_duplicate", path, lineno, iid)
      continue
    title = raw.clean_text(f[ct]) if ct is not None else ""
    desc = raw.clean_text(f[cd]) if cd is not None else ""
    genres = f[cg].split() if cg is not None else []
    out[iid] = raw.ItemText(title, desc, genres)
  return out


def read_atomic(directory: str | os.PathLike, name: str, *, strict: bool = False
                ) -> raw.RawInteractions:
  """Reads `{directory}/{name}.inter` and `{directory}/{name}.item`."""
  inter = os.path.join(directory, f"{name}.inter")
  item = os.path.join(directory, f"{name}.item")
  raw.require_file(inter, "a RecBole .inter file")
  skipped = raw.SkipCounter(strict)
  item_text = read_item_file(item, skipped) if os.path.isfile(item) else None
  if item_text is None:
    raise raw.DataFormatError(f"{item}: file not found (expected a RecBole .item file "
                              "with item titles)")
  b = raw.InteractionBuilder()
  lines = _open_lines(inter)
  first = next(lines, None)
  if first is None or first[1] is None:
    raise raw.DataFormatError(f"{inter}: empty file (expected a header user_id:token "
                              "item_id:token ...)")
  cols = _header(first[1], inter)
  for need in ("user_id", "item_id"):
    if need not in cols:
      raise raw.DataFormatError(f"{inter}: no {need} column in header {list(cols)}")
  cu, ci = cols["user_id"], cols["item_id"]
  cr, cts = cols.get("rating"), cols.get("timestamp")
  for lineno, f in _rows(lines, inter, len(cols), skipped):
    u, i = f[cu].strip(), f[ci].strip()
    if not u or not i:
      skipped.skip("missing_field", inter, lineno, "user_id/item_id")
      continue
    try:
      ts = float(f[cts]) if cts is not None else float(lineno)
      r = float(f[cr]) if cr is not None else math.nan
      if not math.isfinite(ts):
        raise ValueError("non-finite timestamp")
    except ValueError:
      skipped.skip("malformed_number", inter, lineno)
      continue
    if i not in item_text:
      skipped.skip("unknown_item", inter, lineno, i)
      continue
    b.add(u, i, ts, r, lineno)
  sources = {inter: raw.sha256_file(inter), item: raw.sha256_file(item)}
  return b.finish(item_text, skipped, sources, inter)
