"""BERT encoder with sentence-transformers pooling (SBERT), in flax.linen.

The stage-1 text encoder of A-LLMRec: a post-LN BERT (embeddings word + position +
token type, LayerNorm; per layer self-attention -> add & LayerNorm -> GELU FFN -> add &
LayerNorm), then mean pooling over the real tokens (or the CLS state) and, when the
sentence-transformers model has a Normalize module, L2 normalisation. Weights come from
`allmrec_jax/weights/sbert.py`; the reference is sentence-transformers on the CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import common_types as ct
from allmrec_jax.layers import dropout as dropout_lib
from allmrec_jax.layers import linears

_POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Static shape and behaviour of a `BertEncoder` (from a Hugging Face config.json)."""
  vocab_size: int = 30522
  hidden_size: int = 384            # t, the sentence-embedding width
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1       # after embeddings, attention output and FFN output
  attention_dropout: float = 0.1    # on the attention probabilities
  pooling: str = "mean"             # "mean" (masked) | "cls"
  normalize: bool = False           # L2-normalise the pooled embedding
  dtype: str = "float32"            # computation dtype
  param_dtype: str = "float32"      # parameter dtype
  matmul_dtype: str = ""            # "" = dtype; "bfloat16": dense-layer matmul operands in
                                    #   bfloat16, float32 accumulation (linears.py)

  def __post_init__(self):
    if self.pooling not in _POOLINGS:
      raise ValueError(f"BertConfig.pooling must be one of {_POOLINGS}, got {self.pooling!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")

  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> BertConfig:
    """From a parsed Hugging Face BERT config.json (+ pooling/normalize/dtype overrides)."""
    if hf.get("model_type", "bert") != "bert":
      raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'bert'")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"config.json: hidden_act {act!r} unsupported (only exact 'gelu')")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"config.json: position_embedding_type {pos!r} unsupported")
    try:
      kw = dict(
          vocab_size=int(hf["vocab_size"]),
          hidden_size=int(hf["hidden_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=int(hf["num_attention_heads"]),
          intermediate_size=int(hf["intermediate_size"]),
          max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
          type_vocab_size=int(hf.get("type_vocab_size", 2)),
          layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
          hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
          attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
      )
    except KeyError as e:
      raise ValueError(f"config.json: missing field {e.args[0]!r}") from None
    kw.update(overrides)
    return cls(**kw)


def _dense(features: int, axes: tuple[str, str], cfg: BertConfig, name: str) -> nn.Dense:
  low = linears.is_low_precision(cfg.matmul_dtype, cfg.dtype)
  return nn.Dense(
      features,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      dot_general=linears.low_precision_dot_general(cfg.matmul_dtype) if low else None,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
      name=name)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (ct.NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (ct.NORM,)),
      name=name)


def _embed(cfg: BertConfig, name: str, num: int, axes: tuple[str | None, str]) -> nn.Embed:
  return nn.Embed(
      num, cfg.hidden_size,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      name=name)


class BertLayer(nn.Module):
  """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
    """x: float[B, T, t]; bias: float[B, 1, 1, T] additive attention bias."""
    cfg = self.config
    b, t_len, width = x.shape
    nh = cfg.num_heads
    hd = width // nh

    def heads(y):  # [B, T, t] -> [B, T, nh, hd]
      return y.reshape(b, t_len, nh, hd)

    q = heads(_dense(width, (ct.EMBED, ct.HEADS), cfg, "query")(x))
    k = heads(_dense(width, (ct.EMBED, ct.HEADS), cfg, "key")(x))
    v = heads(_dense(width, (ct.EMBED, ct.HEADS), cfg, "value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(
        jnp.float32(hd))
    probs = jax.nn.softmax(logits + bias, axis=-1).astype(x.dtype)
    probs = dropout_lib.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t_len, width)
    attn = _dense(width, (ct.HEADS, ct.EMBED), cfg, "attention_output")(ctx)
    attn = dropout_lib.Dropout(cfg.hidden_dropout)(attn, deterministic=deterministic)
    x = _layer_norm(cfg, "attention_ln")(x + attn)

    h = _dense(cfg.intermediate_size, (ct.EMBED, ct.MLP), cfg, "intermediate")(x)
    h = jax.nn.gelu(h, approximate=False)
    h = _dense(width, (ct.MLP, ct.EMBED), cfg, "output")(h)
    h = dropout_lib.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    return _layer_norm(cfg, "output_ln")(x + h)


class BertEncoder(nn.Module):
  """BERT + sentence-transformers pooling; the SBERT of stage 1.

  Parameter tree: `{word,position,token_type}/embedding`, `embeddings_ln/{scale,bias}`,
  `layer_{i}/{query,key,value,attention_output,intermediate,output}/{kernel,bias}`,
  `layer_{i}/{attention_ln,output_ln}/{scale,bias}`.
  """
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None,
               deterministic: bool = True, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               text_index: jax.Array | None = None,
               num_texts: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sentence embeddings.

    Args:
      input_ids: int32[B, T] token ids (right padding as the tokenizer produces).
      attention_mask: int32[B, T], 1 = real token. A row of zeros (an empty slot such as
        item 0) pools to the zero vector.
      token_type_ids: int32[B, T] or None (= all zeros).
      deterministic: False enables dropout (needs the "dropout" rng).
      positions, segment_ids, text_index, num_texts: packed input (several short texts per
        row, see `pack_texts`): positions int32[B, T] restart at 0 for each text; tokens
        attend only within their segment (segment_ids int32[B, T], equal ids = same text);
        text_index int32[B, T] names the output slot (0..num_texts-1) of each token, and
        the result has num_texts rows. Gives the same embeddings as one row per text.

    Returns:
      (float[B or num_texts, t] pooled (and normalised if configured), aux) with
      aux = {"hidden": float[B, T, t] last-layer token states, "pooled_raw": pooled before
      normalisation}.
    """
    cfg = self.config
    b, t_len = input_ids.shape
    if t_len > cfg.max_position_embeddings:
      raise ValueError(f"BertEncoder: sequence length {t_len} exceeds "
                       f"max_position_embeddings {cfg.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t_len, dtype=jnp.int32)[None, :], (b, t_len))

    x = (_embed(cfg, "word", cfg.vocab_size, (ct.VOCAB, ct.EMBED))(input_ids)
         + _embed(cfg, "position", cfg.max_position_embeddings, (None, ct.EMBED))(positions)
         + _embed(cfg, "token_type", cfg.type_vocab_size, (None, ct.EMBED))(token_type_ids))
    x = _layer_norm(cfg, "embeddings_ln")(x)
    x = dropout_lib.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_EMBED))

    mask = attention_mask.astype(bool)
    if segment_ids is None:
      allowed = mask[:, None, None, :]                                  # [B, 1, 1, T]
    else:
      allowed = ((segment_ids[:, :, None] == segment_ids[:, None, :])
                 & mask[:, None, :])[:, None]                           # [B, 1, T, T]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    for i in range(cfg.num_layers):
      x = BertLayer(cfg, name=f"layer_{i}")(x, bias, deterministic)

    m = mask.astype(jnp.float32)[..., None]
    xf = x.astype(jnp.float32)
    if text_index is not None:
      if num_texts is None:
        raise ValueError("BertEncoder: packed input needs num_texts")
      flat_idx = jnp.where(mask, text_index, num_texts).reshape(-1)
      if cfg.pooling == "mean":
        sums = jax.ops.segment_sum((xf * m).reshape(-1, xf.shape[-1]), flat_idx,
                                   num_segments=num_texts + 1)[:num_texts]
        counts = jax.ops.segment_sum(m.reshape(-1, 1), flat_idx,
                                     num_segments=num_texts + 1)[:num_texts]
        pooled = sums / jnp.maximum(counts, 1e-9)
      else:  # the first token of each text ([CLS])
        first = (positions == 0) & mask
        idx = jnp.where(first, text_index, num_texts).reshape(-1)
        pooled = jax.ops.segment_sum(xf.reshape(-1, xf.shape[-1]), idx,
                                     num_segments=num_texts + 1)[:num_texts]
    elif cfg.pooling == "mean":
      pooled = jnp.sum(xf * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    else:
      pooled = xf[:, 0]
    raw = pooled
    if cfg.normalize:
      norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
      pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled.astype(jnp.dtype(cfg.dtype)), {"hidden": x, "pooled_raw": raw}


def pack_texts(ids: np.ndarray, mask: np.ndarray, rows: int | None = None,
               row_len: int | None = None) -> dict[str, np.ndarray] | None:
  """Packs M right-padded texts into `rows` rows of `row_len` tokens (first-fit decreasing).

  Args:
    ids, mask: int32[M, T] one text per row (e.g. a gather from the item token table).
    rows: number of packed rows (default: as many as needed); row_len: default T.

  Returns:
    dict of int32[rows, row_len] arrays input_ids, attention_mask, positions, segment_ids,
    text_index (inputs of `BertEncoder(..., positions=, segment_ids=, text_index=,
    num_texts=M)`), or None when the texts do not fit into `rows` rows. Empty texts (mask
    all 0) take no space and pool to the zero vector.
  """
  m, t = ids.shape
  row_len = row_len or t
  lengths = mask.sum(axis=1).astype(np.int64)
  if lengths.max(initial=0) > row_len:
    raise ValueError(f"pack_texts: a text of {lengths.max()} tokens exceeds row_len {row_len}")
  order = np.argsort(-lengths, kind="stable")
  fill: list[int] = []
  where = np.zeros((m, 2), np.int64)   # (row, offset) of each text
  for i in order:
    n = lengths[i]
    if n == 0:
      where[i] = (-1, 0)
      continue
    for r, used in enumerate(fill):
      if used + n <= row_len:
        where[i] = (r, used)
        fill[r] = used + n
        break
    else:
      if rows is not None and len(fill) >= rows:
        return None
      where[i] = (len(fill), 0)
      fill.append(int(n))
  nrows = rows if rows is not None else max(len(fill), 1)
  out = {k: np.zeros((nrows, row_len), np.int32)
         for k in ("input_ids", "attention_mask", "positions", "segment_ids", "text_index")}
  real = np.nonzero(lengths > 0)[0]
  if real.size:
    tok_text = np.repeat(real, lengths[real])                        # text of each token
    tok_pos = np.arange(tok_text.size) - np.repeat(np.cumsum(lengths[real]) - lengths[real],
                                                   lengths[real])   # position within text
    r, c = where[tok_text, 0], where[tok_text, 1] + tok_pos
    src = mask[real].astype(bool)
    out["input_ids"][r, c] = ids[real][src]
    out["attention_mask"][r, c] = 1
    out["positions"][r, c] = tok_pos
    out["segment_ids"][r, c] = tok_text + 1
    out["text_index"][r, c] = tok_text
  return out
