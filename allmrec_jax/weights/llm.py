"""Load a causal LM (HF directory or .gguf) into a sharded Flax decoder + tokenizer.

    loaded = load_llm(path, dtype="float32", mesh=None, rules=None)
    logits, aux = loaded.module.apply({"params": loaded.params}, input_ids=ids)

Parameters are never materialised twice: the abstract parameter tree (jax.eval_shape) gives
every destination's shape and sharding; each source tensor is read (and dequantised for
GGUF), re-laid out (transpose / head split) and `device_put` straight into its sharded
destination before the next tensor is read. Peak host memory is about the largest tensor.

The vocabulary is the checkpoint's: A-LLMRec's soft slots ([UserRep], [HistoryEmb],
[CandidateEmb]) are prompt positions whose input embeddings are replaced (data/prompts.py),
not added tokens.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, NamedTuple
from collections.abc import Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import sharding as shd
from allmrec_jax.layers import linears
from allmrec_jax.models import llm as llm_models
from allmrec_jax.weights import gguf as gguf_lib
from allmrec_jax.weights import hf as hf_lib


class LoadedLLM(NamedTuple):
  module: Any           # LlamaDecoder | OPTDecoder
  params: Any           # the "params" collection: apply with {"params": params}
  tokenizer: Any        # a transformers tokenizer (extra special tokens added)
  config: Any           # LlamaConfig | OPTConfig


Transform = Callable[[np.ndarray], np.ndarray]


def _t(w):
  return w.T


def _split_out(heads: int, dim: int) -> Transform:
  """torch Linear weight [H*Dh, E] -> kernel [E, H, Dh]."""
  return lambda w: w.T.reshape(w.shape[1], heads, dim)


def _split_in(heads: int, dim: int) -> Transform:
  """torch Linear weight [E, H*Dh] -> kernel [H, Dh, E]."""
  return lambda w: w.T.reshape(heads, dim, w.shape[0])


def _split_bias(heads: int, dim: int) -> Transform:
  return lambda b: b.reshape(heads, dim)


def _ident(w):
  return w


def llama_name_map(c) -> dict[str, tuple[tuple[str, ...], Transform]]:
  """HF Llama tensor name -> (flax param path, transform)."""
  m = {"model.embed_tokens.weight": (("embed", "embedding"), _ident),
       "model.norm.weight": (("final_norm", "scale"), _ident)}
  if not c.tie_word_embeddings:
    m["lm_head.weight"] = (("lm_head", "kernel"), _t)
  for i in range(c.num_layers):
    hf, fx = f"model.layers.{i}.", f"layers_{i}"
    m[hf + "input_layernorm.weight"] = ((fx, "attn_norm", "scale"), _ident)
    m[hf + "post_attention_layernorm.weight"] = ((fx, "mlp_norm", "scale"), _ident)
    for p, heads in (("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)):
      m[hf + f"self_attn.{p}_proj.weight"] = ((fx, "attn", p, "kernel"), _split_out(heads, c.head_dim))
      if c.attention_bias or c.qkv_bias:
        m[hf + f"self_attn.{p}_proj.bias"] = ((fx, "attn", p, "bias"), _split_bias(heads, c.head_dim))
    m[hf + "self_attn.o_proj.weight"] = ((fx, "attn", "o", "kernel"), _split_in(c.num_heads, c.head_dim))
    if c.attention_bias:
      m[hf + "self_attn.o_proj.bias"] = ((fx, "attn", "o", "bias"), _ident)
    for p in ("gate", "up", "down"):
      m[hf + f"mlp.{p}_proj.weight"] = ((fx, "mlp", p, "kernel"), _t)
      if c.mlp_bias:
        m[hf + f"mlp.{p}_proj.bias"] = ((fx, "mlp", p, "bias"), _ident)
  return m


def opt_name_map(c) -> dict[str, tuple[tuple[str, ...], Transform]]:
  """HF OPT tensor name (without the leading "model.") -> (flax param path, transform)."""
  d = "decoder."
  m = {d + "embed_tokens.weight": (("embed", "embedding"), _ident),
       d + "embed_positions.weight": (("pos_embed",), _ident)}
  if c.has_projections:
    m[d + "project_in.weight"] = (("project_in", "kernel"), _t)
    m[d + "project_out.weight"] = (("project_out", "kernel"), _t)
  affine = c.layer_norm_elementwise_affine
  def norm(hf_prefix, path):
    if affine:
      m[hf_prefix + ".weight"] = (path + ("scale",), _ident)
      m[hf_prefix + ".bias"] = (path + ("bias",), _ident)
  if c.final_layer_norm:
    norm(d + "final_layer_norm", ("final_norm",))
  h, dh = c.num_heads, c.head_dim
  for i in range(c.num_layers):
    hf, fx = f"{d}layers.{i}.", f"layers_{i}"
    norm(hf + "self_attn_layer_norm", (fx, "attn_norm"))
    norm(hf + "final_layer_norm", (fx, "mlp_norm"))
    for p in ("q", "k", "v"):
      m[hf + f"self_attn.{p}_proj.weight"] = ((fx, "attn", p, "kernel"), _split_out(h, dh))
      if c.enable_bias:
        m[hf + f"self_attn.{p}_proj.bias"] = ((fx, "attn", p, "bias"), _split_bias(h, dh))
    m[hf + "self_attn.out_proj.weight"] = ((fx, "attn", "o", "kernel"), _split_in(h, dh))
    if c.enable_bias:
      m[hf + "self_attn.out_proj.bias"] = ((fx, "attn", "o", "bias"), _ident)
    for p in ("fc1", "fc2"):
      m[hf + f"{p}.weight"] = ((fx, "mlp", p, "kernel"), _t)
      if c.enable_bias:
        m[hf + f"{p}.bias"] = ((fx, "mlp", p, "bias"), _ident)
  return m


_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|masked_bias|attn\.bias)$")


def _normalise_name(family: str, name: str) -> str:
  if family == "opt":
    name = name[len("model."):] if name.startswith("model.") else name
  return name


def abstract_params(module, config) -> Any:
  """Boxed abstract parameter tree (no memory)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), input_ids=ids))["params"]


def param_shardings(boxed_abstract, mesh, rules) -> Any:
  """NamedSharding per parameter, dropping mesh axes that do not divide a dimension."""
  shardings = shd.logical_shardings(boxed_abstract, mesh, rules)
  shapes = nn.unbox(boxed_abstract)
  return jax.tree.map(lambda s, a: shd.fit_sharding(s, a.shape), shardings, shapes)


def load_params(module, config, source: hf_lib.TensorSource, mesh=None, rules=None,
                label: str | None = None) -> Any:
  """Streams `source`'s tensors into the decoder's (sharded) parameter tree.

  Raises ValueError naming the file, tensor and expected shape on a missing tensor or a
  shape mismatch.
  """
  boxed = abstract_params(module, config)
  abstract = nn.unbox(boxed)
  shardings = param_shardings(boxed, mesh, rules) if mesh is not None else None
  name_map = llama_name_map(config) if config.family == "llama" else opt_name_map(config)
  flat_abstract = {tuple(str(getattr(k, "key", k)) for k in path): leaf
                   for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  flat_shard = ({tuple(str(getattr(k, "key", k)) for k in path): leaf
                 for path, leaf in jax.tree_util.tree_leaves_with_path(shardings)}
                if shardings is not None else {})
  loaded: dict[tuple[str, ...], jax.Array] = {}
  for name in source.names():
    key = _normalise_name(config.family, name)
    if key not in name_map:
      if not _IGNORED.match(name) and not (key.endswith("lm_head.weight")
                                           and config.tie_word_embeddings):
        logging.warning("%s: tensor %s is not used by the %s decoder", source.file_of(name),
                        name, config.family)
      continue
    path, transform = name_map[key]
    dest = flat_abstract[path]
    raw = source.get(name)
    hf_lib.check_finite(raw, name, source.file_of(name))
    bad = f"{source.file_of(name)}: tensor {name} has shape {tuple(raw.shape)}, expected " + (
        f"{tuple(dest.shape)} for parameter {'/'.join(path)} after re-layout")
    try:
      w = transform(raw)
    except ValueError:
      raise ValueError(bad) from None
    del raw
    if tuple(w.shape) != tuple(dest.shape):
      raise ValueError(bad)
    w = np.ascontiguousarray(w).astype(dest.dtype, copy=False)
    sharding = flat_shard.get(path)
    loaded[path] = jax.device_put(w, sharding) if sharding is not None else jnp.asarray(w)
    del w
  by_path = {path: hf for hf, (path, _) in name_map.items()}
  missing = [p for p in flat_abstract if p not in loaded]
  if missing:
    p = missing[0]
    hf = by_path.get(p, "?")
    where = label or (source.file_of(next(iter(source.names()))) if source.names() else "?")
    raise ValueError(f"{where}: missing tensor {hf} (expected shape "
                     f"{tuple(flat_abstract[p].shape)} for parameter {'/'.join(p)}); "
                     f"{len(missing)} parameter(s) missing")
  leaves_with_path = jax.tree_util.tree_leaves_with_path(abstract)
  treedef = jax.tree_util.tree_structure(abstract)
  return jax.tree_util.tree_unflatten(
      treedef, [loaded[tuple(str(getattr(k, "key", k)) for k in path)]
                for path, _ in leaves_with_path])


def _gguf_tokenizer_cache(gguf_path: pathlib.Path) -> tuple[pathlib.Path, str]:
  st = gguf_path.stat()
  return gguf_path.parent / f"{gguf_path.name}.tokenizer", f"{st.st_size}:{int(st.st_mtime)}"


def _load_tokenizer(directory: pathlib.Path, gguf_file: str | None, use_cache: bool = True):
  """transformers tokenizer of a HF directory or a GGUF file.

  Building a tokenizer from GGUF metadata takes ~10 s (transformers parses the file with
  GGUFReader), so the result is saved next to the file (`<file>.tokenizer/`, stamped with the
  file's size and mtime) and later loads read that folder.
  """
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  try:
    if not gguf_file:
      return AutoTokenizer.from_pretrained(str(directory))
    cache, stamp = _gguf_tokenizer_cache(directory / gguf_file)
    stamp_file = cache / "gguf_stamp.txt"
    if use_cache and stamp_file.exists() and stamp_file.read_text() == stamp:
      return AutoTokenizer.from_pretrained(str(cache))
    tok = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    if use_cache:
      try:
        tok.save_pretrained(str(cache))
        stamp_file.write_text(stamp)
      except OSError as e:
        logging.warning("cannot cache the GGUF tokenizer in %s (%s)", cache, e)
    return tok
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{directory / (gguf_file or '')}: cannot load the tokenizer ({e})") from e


def resolve_path(path_or_name: str | pathlib.Path | None) -> pathlib.Path:
  """"" / None / "smollm2-135m" -> the embedded asset; otherwise a local path."""
  if not path_or_name or str(path_or_name) == "smollm2-135m":
    from allmrec_jax import assets  # pylint: disable=import-outside-toplevel
    return pathlib.Path(assets.get_asset("smollm2-135m"))
  p = pathlib.Path(path_or_name).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"LLM path {p} does not exist (pass a HF model directory or a .gguf file)")
  return p


def read_config(path: pathlib.Path, dtype: str = "float32", **overrides):
  """(family config, tensor source, gguf_file or None) for a HF directory or a .gguf file."""
  kw = dict(dtype=dtype, param_dtype=dtype, **overrides)
  if path.is_file() and path.suffix == ".gguf":
    reader = gguf_lib.read_header(path)
    fields = gguf_lib.llama_config_from_gguf(reader, path)
    from transformers import LlamaConfig as HFLlamaConfig  # pylint: disable=import-outside-toplevel
    hf_config = HFLlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    config = llm_models.LlamaConfig.from_hf(hf_config, **kw)
    source = gguf_lib.GGUFSource(path, config.num_heads, config.num_kv_heads, reader=reader)
    return config, source, path.name
  if path.is_dir():
    cfg_file = path / "config.json"
    if not cfg_file.exists():
      raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    raw = json.loads(cfg_file.read_text())
    family = llm_models.family_of(raw.get("model_type", "?"))
    from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
    hf_config = AutoConfig.from_pretrained(str(path))
    config = family.config.from_hf(hf_config, **kw)
    return config, hf_lib.directory_source(path), None
  raise ValueError(f"LLM path {path}: expected a Hugging Face model directory or a .gguf file")


def load_llm(path_or_name=None, dtype: str = "float32", mesh=None, rules=None,
             remat: bool = False, matmul_dtype: str = "", lora_rank: int = 0,
             lora_alpha: float = 16.0, lora_targets: tuple[str, ...] = ()) -> LoadedLLM:
  """Loads decoder parameters (sharded over `mesh` when given) and the tokenizer.

  Args:
    path_or_name: HF model directory (config.json + safetensors / pytorch_model*.bin), a
      .gguf file, or ""/None/"smollm2-135m" for the embedded SmolLM2-135M-Instruct.
    dtype: "float32" | "bfloat16": compute and parameter dtype.
    mesh, rules: device mesh and logical-axis rules (None = one device).
    remat: rematerialise each decoder layer (stage-2 training).
    matmul_dtype: "" = matmuls in `dtype`; "bfloat16" with dtype "float32" = the dense
      layers' and LM head's matmul operands rounded to bfloat16 with float32 accumulation
      (weights, norms, softmax and the residual stream stay float32); the paper runs its
      OPT-6.7B in float16; "auto" = bfloat16 where the host multiplies it natively
      (`layers.linears.resolve_matmul_dtype`).
    lora_rank, lora_alpha, lora_targets: the shape of LoRA adapters the decoder reads when a
      "lora" collection is passed (models/lora.py); the loaded weights are unchanged.
  """
  path = resolve_path(path_or_name)
  config, source, gguf_file = read_config(path, dtype, remat=remat,
                                          matmul_dtype=linears.resolve_matmul_dtype(
                                              matmul_dtype),
                                          lora_rank=int(lora_rank),
                                          lora_alpha=float(lora_alpha),
                                          lora_targets=tuple(lora_targets))
  module = llm_models.make_decoder(config)
  params = load_params(module, config, source, mesh, rules, label=str(path))
  tokenizer = _load_tokenizer(path.parent if gguf_file else path, gguf_file)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return LoadedLLM(module, params, tokenizer, config)
