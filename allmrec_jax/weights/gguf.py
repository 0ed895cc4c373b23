"""GGUF files (llama.cpp): metadata -> config, tensors -> HF names and layout.

The header (metadata + tensor table) is parsed here directly: `gguf.GGUFReader` builds a
numpy view per token string and needs ~10 s for a 49k-token vocabulary, this parser ~0.1 s.
Tensors are memory-mapped and dequantised one at a time with `gguf.quants.dequantize`. llama.cpp's converter
row-permutes the q and k projections (interleaved rotary pairs); `unpermute_rows` restores
the "rotate half" layout of Hugging Face weights (the inverse of that permutation, as
transformers' GGUF loader applies it).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import struct
from typing import Any

import numpy as np

from allmrec_jax.weights.hf import TensorSource

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation for `n_head` heads (rows = heads * Dh)."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
       6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass
class GGUFTensorInfo:
  name: str
  dims: tuple[int, ...]     # GGUF order (fastest-varying first); numpy shape = reversed
  ggml_type: int
  offset: int               # absolute byte offset in the file


@dataclasses.dataclass
class GGUFHeader:
  """Metadata (scalars, strings, numeric arrays as numpy; string arrays as lists) and the
  tensor table of a GGUF file, plus a read-only memory map of the whole file."""
  path: pathlib.Path
  fields: dict[str, Any]
  tensors: list[GGUFTensorInfo]
  data: np.memmap

  def get(self, key: str, default=None):
    return self.fields.get(key, default)


def read_header(path: str | pathlib.Path) -> GGUFHeader:
  """Parses a little-endian GGUF v2/v3 file's metadata and tensor table; a file cut
  inside its header raises ValueError naming the file."""
  path = pathlib.Path(path)
  try:
    return _read_header(path)
  except (struct.error, IndexError) as e:
    raise ValueError(f"{path}: GGUF header is truncated or corrupt ({path.stat().st_size} "
                     f"bytes; {e})") from None


def _read_header(path: pathlib.Path) -> GGUFHeader:
  if path.stat().st_size < 24:
    raise ValueError(f"{path}: not a GGUF file ({path.stat().st_size} bytes, shorter than "
                     f"the 24-byte GGUF preamble)")
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  buf = memoryview(mm)
  if bytes(buf[:4]) != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file (bad magic)")
  version, = struct.unpack_from("<I", buf, 4)
  if version not in (2, 3):
    raise ValueError(f"{path}: GGUF version {version} is not supported (2, 3)")
  n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
  off = 24

  def string(o):
    n, = struct.unpack_from("<Q", buf, o)
    if o + 8 + n > len(buf):
      raise struct.error(f"a string of {n} bytes at byte {o} runs past the end")
    return bytes(buf[o + 8:o + 8 + n]).decode("utf-8", errors="replace"), o + 8 + n

  def value(vtype, o):
    if vtype in _SCALARS:
      fmt = _SCALARS[vtype]
      return struct.unpack_from(fmt, buf, o)[0], o + struct.calcsize(fmt)
    if vtype == _STRING:
      return string(o)
    if vtype == _ARRAY:
      itype, count = struct.unpack_from("<IQ", buf, o)
      o += 12
      if itype in _NP:
        if o + count * np.dtype(_NP[itype]).itemsize > len(buf):
          raise struct.error(f"an array of {count} values at byte {o} runs past the end")
        arr = np.frombuffer(buf, dtype=_NP[itype], count=count, offset=o)
        return arr, o + arr.nbytes
      items = []
      for _ in range(count):
        v, o = value(itype, o)
        items.append(v)
      return items, o
    raise ValueError(f"{path}: unknown GGUF value type {vtype} at byte {o}")

  fields = {}
  for _ in range(n_kv):
    key, off = string(off)
    vtype, = struct.unpack_from("<I", buf, off)
    fields[key], off = value(vtype, off + 4)
  infos = []
  for _ in range(n_tensors):
    name, off = string(off)
    n_dims, = struct.unpack_from("<I", buf, off)
    dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
    off += 4 + 8 * n_dims
    ggml_type, rel = struct.unpack_from("<IQ", buf, off)
    off += 12
    infos.append(GGUFTensorInfo(name, tuple(int(d) for d in dims), int(ggml_type), int(rel)))
  align = int(fields.get("general.alignment", 32))
  start = (off + align - 1) // align * align
  for t in infos:
    t.offset += start
  return GGUFHeader(path, fields, infos, mm)


def tensor_array(header: GGUFHeader, t: GGUFTensorInfo) -> np.ndarray:
  """float32 numpy array (numpy/HF layout: reversed GGUF dims) of one tensor."""
  import gguf  # pylint: disable=import-outside-toplevel
  from gguf import quants  # pylint: disable=import-outside-toplevel
  qtype = gguf.GGMLQuantizationType(t.ggml_type)
  shape = tuple(reversed(t.dims))
  n = int(np.prod(shape))
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  nbytes = n * type_size // block
  raw = header.data[t.offset:t.offset + nbytes]
  if raw.size != nbytes:
    raise ValueError(f"{header.path}: tensor {t.name} is truncated "
                     f"(expected {nbytes} bytes at offset {t.offset})")
  if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
    w = quants.dequantize(raw, qtype)
  else:
    w = quants.dequantize(raw.reshape(shape[:-1] + (shape[-1] // block * type_size,)), qtype)
  return np.asarray(w, dtype=np.float32).reshape(shape)


def _field(reader: GGUFHeader, key: str, default=None):
  v = reader.get(key, default)
  return v.tolist() if isinstance(v, np.ndarray) else v


class GGUFSource(TensorSource):
  """The tensors of a llama-architecture GGUF file under Hugging Face Llama names."""

  def __init__(self, path: pathlib.Path, num_heads: int, num_kv_heads: int,
               reader: GGUFHeader | None = None):
    self.path = pathlib.Path(path)
    self.reader = reader if reader is not None else read_header(path)
    self._tensors = {}
    for t in self.reader.tensors:
      name = self.hf_name(t.name)
      if name is not None:
        self._tensors[name] = t
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads

  @staticmethod
  def hf_name(name: str) -> str | None:
    if name in _GLOBAL_MAP:
      return _GLOBAL_MAP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_MAP:
      return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None  # e.g. rope_freqs.weight (recomputed from the config)

  def names(self):
    return list(self._tensors)

  def file_of(self, name):
    return str(self.path)

  def get(self, name):
    w = tensor_array(self.reader, self._tensors[name])
    if ".self_attn.q_proj." in name:
      w = unpermute_rows(w, self.num_heads)
    elif ".self_attn.k_proj." in name:
      w = unpermute_rows(w, self.num_kv_heads)
    return w.astype(np.float32, copy=False)


def llama_config_from_gguf(reader, path) -> dict[str, Any]:
  """transformers-style LlamaConfig fields from GGUF metadata (llama architecture)."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")
  g = lambda k, d=None: _field(reader, f"llama.{k}", d)
  names = {t.name for t in reader.tensors}
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  vocab = g("vocab_size")
  if vocab is None:
    vocab = len(reader.get("tokenizer.ggml.tokens", ()))
  cfg = dict(
      model_type="llama", vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
      num_attention_heads=heads, num_key_value_heads=int(g("attention.head_count_kv", heads)),
      head_dim=int(g("attention.key_length", g("rope.dimension_count", hidden // heads))),
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(g("rope.freq_base", 10000.0)),
      max_position_embeddings=int(g("context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))
  kind = g("rope.scaling.type")
  if kind and kind != "none":
    if kind != "linear":
      raise ValueError(f"{path}: GGUF rope scaling {kind!r} is not supported")
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
  return cfg
