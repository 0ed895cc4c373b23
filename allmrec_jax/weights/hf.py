"""Tensor sources for Hugging Face model directories: safetensors shards or pytorch_model*.bin.

A source lists tensor names and reads one tensor at a time as a numpy array (bfloat16 kept
as ml_dtypes.bfloat16), so a loader never holds more than one source tensor on the host.
"""

from __future__ import annotations

import json
import pathlib
import ml_dtypes
import numpy as np


def torch_to_numpy(t) -> np.ndarray:
  """A CPU torch tensor as numpy without an fp32 detour for bfloat16."""
  import torch  # pylint: disable=import-outside-toplevel
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def check_finite(arr: np.ndarray, name: str, where: str) -> None:
  """Raises ValueError naming the file and tensor when `arr` holds NaN or Inf (a corrupt
  weights file loads otherwise silently into NaN logits)."""
  a = np.asarray(arr)
  if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
    return
  finite = np.isfinite(a.astype(np.float32, copy=False))
  if not finite.all():
    bad = int(finite.size - np.count_nonzero(finite))
    raise ValueError(f"{where}: tensor {name} has {bad} non-finite value(s) (NaN/Inf) of "
                     f"{finite.size}: the weights file is corrupt")


class TensorSource:
  """Interface: names(), file_of(name), get(name) -> np.ndarray."""

  def names(self) -> list[str]:
    raise NotImplementedError

  def file_of(self, name: str) -> str:
    raise NotImplementedError

  def get(self, name: str) -> np.ndarray:
    raise NotImplementedError


class DictSource(TensorSource):
  """In-memory tensors (tests, converted torch state dicts)."""

  def __init__(self, tensors: dict, label: str = "<state dict>"):
    self._tensors = tensors
    self._label = label

  def names(self):
    return list(self._tensors)

  def file_of(self, name):
    return self._label

  def get(self, name):
    t = self._tensors[name]
    return t if isinstance(t, np.ndarray) else torch_to_numpy(t)


def safe_open(path, framework: str):
  """safetensors.safe_open whose errors (cut file, bad header) name the file."""
  import safetensors  # pylint: disable=import-outside-toplevel
  try:
    return safetensors.safe_open(str(path), framework=framework)
  except Exception as e:   # SafetensorError, OSError: one line naming the file
    msg = " ".join(str(e).split())[:200]
    raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                     f"{msg}); download it again") from e


class SafetensorsSource(TensorSource):
  """model.safetensors or sharded model-0000x-of-0000y.safetensors (+ index json)."""

  def __init__(self, files: list[pathlib.Path]):
    self._handles = {}
    self._where = {}
    for f in files:
      h = safe_open(f, framework="pt")
      self._handles[f] = h
      for k in h.keys():  # noqa: SIM118  (a safetensors handle: no __iter__)
        self._where[k] = f

  def names(self):
    return list(self._where)

  def file_of(self, name):
    return str(self._where.get(name, next(iter(self._handles), "?")))

  def get(self, name):
    return torch_to_numpy(self._handles[self._where[name]].get_tensor(name))


class TorchBinSource(TensorSource):
  """pytorch_model.bin shards read with torch.load(weights_only=True, mmap=True)."""

  def __init__(self, files: list[pathlib.Path]):
    import torch  # pylint: disable=import-outside-toplevel
    self._dicts = {}
    self._where = {}
    for f in files:
      try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError:  # old non-zip format cannot be memory-mapped
        sd = torch.load(str(f), map_location="cpu", weights_only=True)
      self._dicts[f] = sd
      for k in sd:
        self._where[k] = f

  def names(self):
    return list(self._where)

  def file_of(self, name):
    return str(self._where.get(name, next(iter(self._dicts), "?")))

  def get(self, name):
    return torch_to_numpy(self._dicts[self._where[name]][name])


def _shard_files(directory: pathlib.Path, index_name: str, single: str, pattern: str
                 ) -> list[pathlib.Path]:
  index = directory / index_name
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return [directory / f for f in sorted(set(weight_map.values()))]
  if (directory / single).exists():
    return [directory / single]
  return sorted(directory.glob(pattern))


def directory_source(directory: pathlib.Path) -> TensorSource:
  """The tensors of a HF model directory (safetensors preferred over .bin)."""
  files = _shard_files(directory, "model.safetensors.index.json", "model.safetensors",
                       "*.safetensors")
  if files:
    return SafetensorsSource(files)
  files = _shard_files(directory, "pytorch_model.bin.index.json", "pytorch_model.bin",
                       "pytorch_model*.bin")
  if files:
    return TorchBinSource(files)
  raise FileNotFoundError(f"{directory}: no model.safetensors / pytorch_model*.bin weights")
