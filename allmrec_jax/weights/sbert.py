"""Sentence-transformers directory -> `BertEncoder` + parameters + tokenizer.

Reads config.json (BERT shape), model.safetensors (one tensor at a time, numpy),
modules.json (is there a Normalize module?), 1_Pooling/config.json (mean or CLS pooling)
and the tokenizer through transformers (local directory only, never the hub).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import sharding as shd
from allmrec_jax.layers import linears
from allmrec_jax.models.text import bert
from allmrec_jax.weights import hf as hf_lib


class LoadedSBERT(NamedTuple):
  module: bert.BertEncoder
  params: Any                 # the "params" collection: apply with {"params": params}
  tokenizer: Any              # a transformers tokenizer
  pooling_info: dict[str, Any]  # pooling, normalize, max_seq_length, dim


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"sentence-transformers model: missing {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None


def read_pooling_info(path: pathlib.Path, hidden_size: int) -> dict[str, Any]:
  """Pooling mode and normalisation from modules.json and the Pooling module's config."""
  info = {"pooling": "mean", "normalize": False, "max_seq_length": 512, "dim": hidden_size}
  modules_file = path / "modules.json"
  modules = _read_json(modules_file) if modules_file.exists() else []
  pool_dir = None
  for m in modules:
    kind = str(m.get("type", ""))
    if kind.endswith(".Pooling"):
      pool_dir = path / m.get("path", "1_Pooling")
    elif kind.endswith(".Normalize"):
      info["normalize"] = True
    elif kind.endswith((".Transformer", ".models.Transformer")):
      pass
    else:
      raise ValueError(f"{modules_file}: unsupported sentence-transformers module {kind!r}")
  if pool_dir is not None and (pool_dir / "config.json").exists():
    pc = _read_json(pool_dir / "config.json")
    modes = [k for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                         "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                         "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
             if pc.get(k)]
    if modes == ["pooling_mode_mean_tokens"]:
      info["pooling"] = "mean"
    elif modes == ["pooling_mode_cls_token"]:
      info["pooling"] = "cls"
    else:
      raise ValueError(f"{pool_dir / 'config.json'}: pooling modes {modes} unsupported "
                       "(only exactly one of mean_tokens / cls_token)")
    dim = pc.get("word_embedding_dimension", hidden_size)
    if dim != hidden_size:
      raise ValueError(f"{pool_dir / 'config.json'}: word_embedding_dimension {dim} != "
                       f"hidden_size {hidden_size}")
  sb = path / "sentence_bert_config.json"
  if sb.exists():
    info["max_seq_length"] = int(_read_json(sb).get("max_seq_length", 512))
  return info


# HF tensor name (without a "bert." prefix) -> (our path, transpose?)
_LAYER_MAP = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_ln",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_ln",
}
_TOP_MAP = {
    "embeddings.word_embeddings": "word",
    "embeddings.position_embeddings": "position",
    "embeddings.token_type_embeddings": "token_type",
    "embeddings.LayerNorm": "embeddings_ln",
}
_LEAF = {"weight": None, "bias": "bias", "gamma": "scale", "beta": "bias"}


def _target(name: str) -> tuple[str, ...] | None:
  """Our parameter path for an HF tensor name, or None for tensors we do not use."""
  name = name.removeprefix("bert.").removeprefix("0.auto_model.")
  module, _, leaf = name.rpartition(".")
  if leaf not in _LEAF:
    return None
  m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
  if m:
    sub = _LAYER_MAP.get(m.group(2))
    if sub is None:
      return None
    path = (f"layer_{int(m.group(1))}", sub)
  elif module in _TOP_MAP:
    path = (_TOP_MAP[module],)
  else:
    return None  # pooler, position_ids, heads we do not use
  last = path[-1]
  if leaf == "weight":
    if last in ("word", "position", "token_type"):
      return path + ("embedding",)
    if last.endswith("_ln"):
      return path + ("scale",)
    return path + ("kernel",)
  return path + (_LEAF[leaf],)


def _fit(sharding: jax.sharding.NamedSharding, shape: tuple[int, ...]):
  """Drops mesh axes from dimensions they do not divide (e.g. BERT's 30522-row vocab)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for d, axes in enumerate(spec):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([sharding.mesh.shape[a] for a in names]))
    if shape[d] % size:
      spec[d] = None
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


_NORMALIZE = {"auto": None, "true": True, "false": False}


def resolve_normalize(setting: str | bool | None, from_model: bool) -> bool:
  """The final L2 normalisation to apply: `setting` "auto" (or None) = as the model's
  modules.json says (`from_model`), "true"/"false" (or a bool) = forced on/off."""
  if isinstance(setting, bool):
    return setting
  key = "auto" if setting is None else str(setting).strip().lower()
  if key not in _NORMALIZE:
    raise ValueError(f"config.sbert.normalize must be 'auto', 'true' or 'false', got "
                     f"{setting!r}")
  forced = _NORMALIZE[key]
  return from_model if forced is None else forced


def load_sbert(path: str | pathlib.Path | None = None, dtype: str = "float32",
               mesh: jax.sharding.Mesh | None = None, rules=None,
               normalize: str | bool | None = "auto",
               matmul_dtype: str = "") -> LoadedSBERT:
  """Loads a sentence-transformers BERT model directory.

  Args:
    path: the directory ("" / None = the embedded all-MiniLM-L6-v2 asset).
    dtype: computation and parameter dtype ("float32", "bfloat16").
    mesh, rules: when a mesh is given, each tensor is placed straight into its sharded
      device array (logical axes -> mesh through `rules`).
    normalize: "auto" = L2-normalise the pooled embedding iff modules.json has a Normalize
      module; "false" = never (the raw pooled embedding, as the paper's nq-distilbert-base-v1
      produces); "true" = always. pooling_info["normalize"] is the value applied and
      pooling_info["normalize_in_model"] what modules.json says.
    matmul_dtype: "" = matmuls in `dtype`; "bfloat16" with dtype "float32" = the dense
      layers' matmul operands rounded to bfloat16 with float32 accumulation (everything
      else, weights and optimizer state included, stays float32); see
      `layers.linears.low_precision_dot_general`; "auto" = bfloat16 where the host
      multiplies it natively (`layers.linears.resolve_matmul_dtype`).

  Returns:
    LoadedSBERT(module, params, tokenizer, pooling_info) (unpacks as a 4-tuple).
  """
  if not path:
    from allmrec_jax import assets  # pylint: disable=g-import-not-at-top
    path = assets.get_asset("all-minilm-l6-v2")
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"load_sbert: {path} is not a sentence-transformers directory")
  hf = _read_json(path / "config.json")
  hidden = int(hf.get("hidden_size", 0))
  info = read_pooling_info(path, hidden)
  info["normalize_in_model"] = info["normalize"]
  info["normalize"] = resolve_normalize(normalize, info["normalize"])
  cfg = bert.BertConfig.from_hf(hf, pooling=info["pooling"], normalize=info["normalize"],
                                dtype=dtype, param_dtype=dtype,
                                matmul_dtype=linears.resolve_matmul_dtype(matmul_dtype))
  module = bert.BertEncoder(cfg)

  ids = jnp.zeros((1, 2), jnp.int32)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids))["params"]
  shapes = nn.unbox(abstract)
  shardings = shd.logical_shardings(abstract, mesh, rules) if mesh is not None else None

  weights_file = path / "model.safetensors"
  if not weights_file.exists():
    raise FileNotFoundError(f"load_sbert: missing {weights_file}")
  loaded: dict[tuple[str, ...], jax.Array] = {}
  with hf_lib.safe_open(weights_file, framework="numpy") as f:
    for name in f.keys():  # noqa: SIM118  (a safetensors handle: no __iter__)
      tgt = _target(name)
      if tgt is None:
        continue
      try:
        want = shapes
        for k in tgt:
          want = want[k]
      except KeyError:
        raise ValueError(f"{weights_file}: tensor {name} maps to {'/'.join(tgt)}, which the "
                         f"config ({cfg.num_layers} layers) does not have") from None
      arr = f.get_tensor(name)
      hf_lib.check_finite(arr, name, str(weights_file))
      if tgt[-1] == "kernel":
        arr = arr.T
      if tuple(arr.shape) != tuple(want.shape):
        raise ValueError(f"{weights_file}: tensor {name} has shape {tuple(arr.shape)}, "
                         f"expected {tuple(want.shape)} for {'/'.join(tgt)}")
      arr = np.asarray(arr, dtype=jnp.dtype(dtype))
      if shardings is not None:
        s = shardings
        for k in tgt:
          s = s[k]
        loaded[tgt] = jax.device_put(arr, _fit(s, arr.shape))
      else:
        loaded[tgt] = jnp.asarray(arr)
      del arr

  params: dict[str, Any] = {}
  missing = []
  for kp, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    key = tuple(k.key for k in kp)
    if key not in loaded:
      missing.append("/".join(key))
      continue
    node = params
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = loaded[key]
  if missing:
    raise ValueError(f"{weights_file}: missing tensors for {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}")

  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  return LoadedSBERT(module, params, tokenizer, info)


def tokenize_texts(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises once into a fixed-length table: (ids int32[N, max_len], mask int32[N, max_len]).

  Texts are truncated to `max_len` tokens ([CLS] ... [SEP]) and right-padded. An empty text
  ("" — e.g. the padding item 0) gets an all-zero row (pools to the zero vector).
  """
  enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                  return_attention_mask=True, return_token_type_ids=False)
  ids = np.asarray(enc["input_ids"], dtype=np.int32)
  mask = np.asarray(enc["attention_mask"], dtype=np.int32)
  for i, t in enumerate(texts):
    if not t:
      ids[i] = 0
      mask[i] = 0
  return ids, mask
