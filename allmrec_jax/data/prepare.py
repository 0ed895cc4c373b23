"""`prepare_dataset(config.data)`: raw files -> processed `RecDataset`, written once.

Dataset specs (`config.data.dataset`):
  "ml-100k"                     MovieLens-100K (RecBole atomic files; the embedded asset
                                unless `data.path` names a folder holding them)
  "atomic:DIR:name"             any RecBole atomic pair DIR/name.inter + DIR/name.item
  "amazon2018:DIR:Category"     DIR/{Category}.json.gz + DIR/meta_{Category}.json.gz
  "amazon2023:DIR:Category"     DIR/{Category}.jsonl.gz + DIR/meta_{Category}.jsonl.gz

The result goes to `{data_dir}/{name}-{hash of the options}/` with a manifest (source
files and sha256, options, statistics, skipped lines per reason); a second call with the
same options loads that folder (pass overwrite=True / --overwrite after the raw files
change: the folder name hashes the options, not the file contents).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time

from absl import logging

from allmrec_jax.data import amazon
from allmrec_jax.data import atomic
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import preprocess
from allmrec_jax.data import raw

NO_TITLE = "No Title"
_DOMAINS = {"Movies_and_TV": "movies", "Video_Games": "games"}


def _get(cfg, key, default):
  """cfg.key (ConfigDict, dict or object); `default` where absent or None."""
  v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if v is None else v


def parse_spec(spec: str, path: str = "") -> tuple[str, str, str]:
  """(kind, directory, name) of a dataset spec string; see the module docstring."""
  spec = spec.strip()
  if spec in ("ml-100k", "movielens-100k"):
    return "atomic", path, "ml-100k"
  parts = spec.split(":")
  if len(parts) >= 3 and parts[0] in ("atomic", "amazon2018", "amazon2023"):
    kind, name = parts[0], parts[-1]
    directory = ":".join(parts[1:-1])
    if not directory or not name:
      raise ValueError(f"--dataset={spec!r}: expected {kind}:DIR:NAME")
    return kind, directory, name
  raise ValueError(f"--dataset={spec!r}: expected 'ml-100k', 'atomic:DIR:name', "
                   "'amazon2018:DIR:Category' or 'amazon2023:DIR:Category'")


def dataset_name(kind: str, name: str) -> str:
  return name if kind == "atomic" else f"{kind}-{name}"


def domain_of(kind: str, name: str) -> str:
  if kind == "atomic":
    return "movies" if name.lower().startswith("ml-") else "items"
  return _DOMAINS.get(name, "items")


def options_of(data_cfg) -> dict:
  """The preprocessing options that determine the processed arrays."""
  kind, directory, name = parse_spec(_get(data_cfg, "dataset", "ml-100k"),
                                     _get(data_cfg, "path", ""))
  if kind == "atomic" and name == "ml-100k" and not directory:
    directory = "<asset:ml-100k>"
  mode = str(_get(data_cfg, "description_mode", "first"))
  if mode not in ("first", "join"):
    raise ValueError(f"data.description_mode must be 'first' or 'join', got {mode!r}")
  if int(_get(data_cfg, "min_count", 5)) < 1:
    raise ValueError(f"data.min_count must be >= 1, got {_get(data_cfg, 'min_count', 5)}")
  return {
      "kind": kind, "directory": os.path.abspath(os.path.expanduser(directory))
      if not directory.startswith("<") else directory, "name": name,
      "min_count": int(_get(data_cfg, "min_count", 5)),
      "iterative_kcore": bool(_get(data_cfg, "iterative_kcore", False)),
      "rating_threshold": float(_get(data_cfg, "rating_threshold", 0.0)),
      "candidate_seed": int(_get(data_cfg, "candidate_seed", 2024)),
      "description_mode": mode,
      "skip_unknown_items": bool(_get(data_cfg, "skip_unknown_items", True)),
      "strict": bool(_get(data_cfg, "strict", False)),
      "format_version": dataset_lib.FORMAT_VERSION,
  }


def output_dir(data_cfg) -> pathlib.Path:
  opts = options_of(data_cfg)
  h = hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:10]
  root = pathlib.Path(os.path.expanduser(_get(data_cfg, "data_dir",
                                              "~/.cache/allmrec_jax/processed")))
  return root / f"{dataset_name(opts['kind'], opts['name'])}-{h}"


def read_raw(data_cfg) -> raw.RawInteractions:
  """Dispatches to the reader of the configured format."""
  opts = options_of(data_cfg)
  strict = bool(_get(data_cfg, "strict", False))
  kind, directory, name = opts["kind"], opts["directory"], opts["name"]
  if directory == "<asset:ml-100k>":
    from allmrec_jax import assets  # pylint: disable=g-import-not-at-top
    directory = str(assets.get_asset("ml-100k"))    # the cache of $ALLMREC_CACHE / default
  if kind == "atomic":
    return atomic.read_atomic(directory, name, strict=strict)
  if kind == "amazon2018":
    return amazon.read_amazon2018(directory, name, strict=strict,
                                  description_mode=opts["description_mode"],
                                  skip_unknown_items=opts["skip_unknown_items"])
  return amazon.read_amazon2023(directory, name, strict=strict,
                                description_mode=opts["description_mode"],
                                skip_unknown_items=opts["skip_unknown_items"])


def process(data_cfg) -> dataset_lib.RecDataset:
  """Reads and processes the raw data (no caching)."""
  opts = options_of(data_cfg)
  t0 = time.time()
  r = read_raw(data_cfg)
  if r.users.size == 0:
    raise raw.DataFormatError(f"{', '.join(r.sources)}: no valid interaction read")
  seqs = preprocess.make_sequences(
      r, min_count=opts["min_count"], rating_threshold=opts["rating_threshold"],
      iterative_kcore=opts["iterative_kcore"])
  titles, descs, genres = [""], [""], [[]]
  fallbacks = {"no_title": 0, "no_description": 0}
  for key in seqs.item_keys[1:]:
    t = r.item_text.get(key)
    title = t.title if t else ""
    if not title:
      fallbacks["no_title"] += 1
      title = NO_TITLE
    desc = t.description if t else ""
    if not desc:
      fallbacks["no_description"] += 1
    titles.append(title)
    descs.append(desc)
    genres.append(list(t.genres) if t else [])
  manifest = {
      "name": dataset_name(opts["kind"], opts["name"]),
      "options": opts,
      "sources": {os.path.basename(p): {"path": p, "sha256": h, **_stat_of(p)}
                  for p, h in r.sources.items()},
      "skipped": r.skipped.as_dict(),
      "text_fallbacks": fallbacks,
      "preprocess": seqs.stats,
      "seconds": round(time.time() - t0, 3),
  }
  return dataset_lib.build_dataset(
      name=manifest["name"], domain=domain_of(opts["kind"], opts["name"]),
      seq_offsets=seqs.seq_offsets, seq_items=seqs.seq_items,
      num_items=len(seqs.item_keys) - 1, titles=titles, descriptions=descs,
      genres=genres, candidate_seed=opts["candidate_seed"], manifest=manifest,
      item_ids=tuple(seqs.item_keys), cold_user_items=seqs.cold_user_items)


def _stat_of(path: str) -> dict:
  st = os.stat(path)
  return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def changed_sources(manifest: dict) -> list[str]:
  """The raw files of a processed dataset that changed since it was made: a file whose size
  or mtime differs (or that the manifest has no stat of) is hashed again and counts when
  its sha256 differs. A raw file that no longer exists is not counted (the processed copy
  is all there is)."""
  changed = []
  for src in manifest.get("sources", {}).values():
    p = src.get("path", "")
    if not p or not os.path.isfile(p):
      continue
    if _stat_of(p) == {k: src.get(k) for k in ("size", "mtime_ns")}:
      continue
    if raw.sha256_file(p) != src.get("sha256"):
      changed.append(p)
  return changed


def prepare_dataset(data_cfg, *, overwrite: bool = False) -> dataset_lib.RecDataset:
  """Returns the processed dataset of `data_cfg`, processing and saving it once; processes
  again when a raw file changed since (size/mtime, then sha256)."""
  out = output_dir(data_cfg)
  if not overwrite and (out / dataset_lib.JSON_FILE).is_file():
    ds = dataset_lib.load_dataset(out)
    changed = changed_sources(ds.manifest)
    if not changed:
      ds.manifest["output_dir"] = str(out)
      return ds
    logging.warning("%s: raw file(s) changed since it was prepared (%s); preparing again",
                    out, ", ".join(changed))
  ds = process(data_cfg)
  ds.manifest["output_dir"] = str(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
  try:
    dataset_lib.save_dataset(ds, tmp)
    with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
      json.dump(ds.manifest, f, indent=2, ensure_ascii=False)
    if out.exists():
      shutil.rmtree(out)
    try:
      os.replace(tmp, out)
    except OSError:
      # Another process (e.g. another host) finished the same folder first: keep theirs.
      if not (out / dataset_lib.JSON_FILE).is_file():
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  logging.info("prepared %s -> %s", ds.name, out)
  return ds
