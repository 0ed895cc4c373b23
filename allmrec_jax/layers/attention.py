"""Multi-head / grouped-query self-attention with a KV cache; softmax in float32.

KV cache (shared by every decoder): a pytree
  {"layers": tuple over layers of {"k": float[B, Hkv, S, Dh], "v": float[B, Hkv, S, Dh]},
   "end": int32[]}  # slots [0, end) are filled
created by `init_kv_cache`. A call with T new tokens writes them at slots [end, end + T) and
returns end + T. The attention mask then covers the whole window: int[B, S], 1 = valid slot.
A prefill may pass "end" as the Python 0 (`generate.prefill`): the layers then know
statically that the cache is empty and attend over the T new slots only. The cache is laid
out heads-first, the layout the score and value matmuls read, so a decoding step reads it
in place (a [B, S, Hkv, Dh] cache was transposed whole, per layer and step: SmolLM2's
decoding step at batch 8 took 65 / 94 ms at a 320 / 576-slot window, now 61 / 82, on a
2-core AVX512-BF16 CPU).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.layers import rotary
from allmrec_jax.layers.linears import DenseGeneral

Cache = dict[str, Any]


def init_kv_cache(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype: ct.DType = jnp.float32) -> Cache:
  """An empty cache of `max_len` slots (end = 0)."""
  shape = (batch, num_kv_heads, max_len, head_dim)
  layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(num_layers))
  return {"layers": layers, "end": jnp.zeros((), jnp.int32)}


def mask_and_positions(attention_mask: ct.Array | None, batch: int, length: int,
                       cache: Cache | None, positions: ct.Array | None,
                       sliding_window: int | None = None) -> tuple[ct.Array, ct.Array]:
  """The boolean attention pattern and the positions of T new tokens.

  Args:
    attention_mask: int[B, T] without a cache, int[B, S] (whole window) with one; None = all
      valid (with a cache: the slots [0, end + T)); or an explicit pattern bool[B, T, S]
      (used as given, no causal rule added; `positions` are then required).
    batch, length: B and T.
    cache: the KV cache or None.
    positions: int[B, T] or None = cumsum(mask) - 1 at the new tokens' slots, clipped at 0.
    sliding_window: if set, query slot i also needs i - j < sliding_window.

  Returns:
    (bool[B, T, S] mask: query t (slot end + t) sees key slot j iff mask[j] and j <= end + t,
     int32[B, T] positions). Without a cache S = T and end = 0.
  """
  if cache is None:
    window, end = length, jnp.zeros((), jnp.int32)
  else:
    window, end = cache["layers"][0]["k"].shape[2], cache["end"]
  if attention_mask is not None and attention_mask.ndim == 3:
    # An explicit pattern (e.g. packed continuations sharing one prompt cache).
    if attention_mask.shape != (batch, length, window):
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected "
                       f"{(batch, length, window)} (an explicit [B, T, S] pattern)")
    if positions is None:
      raise ValueError("an explicit [B, T, S] attention_mask needs explicit positions")
    return attention_mask.astype(bool), positions.astype(jnp.int32)
  slots = jnp.arange(window, dtype=jnp.int32)
  if attention_mask is None:
    valid = jnp.broadcast_to(slots[None, :] < end + length, (batch, window))
  else:
    if attention_mask.shape != (batch, window):
      what = "the cache window" if cache is not None else "the input length"
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected "
                       f"{(batch, window)} ({what})")
    valid = attention_mask.astype(bool)
  query_slots = end + jnp.arange(length, dtype=jnp.int32)                   # [T]
  causal = slots[None, :] <= query_slots[:, None]                           # [T, S]
  if sliding_window is not None:
    causal &= query_slots[:, None] - slots[None, :] < sliding_window
  mask = valid[:, None, :] & causal[None, :, :]
  if positions is None:
    full = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
    if cache is None:
      positions = full
    else:
      positions = lax.dynamic_slice_in_dim(full, end, length, axis=1)
    positions = jnp.maximum(positions, 0)
  return mask, positions.astype(jnp.int32)


def _softmax(scores: ct.Array) -> ct.Array:
  """Softmax over the last axis. The row maximum it subtracts is a constant to autodiff
  (the softmax does not depend on it), which spares the backward pass a reduction and a
  select per score; values and gradients are jax.nn.softmax's within float32 rounding."""
  top = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  e = jnp.exp(scores - top)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _heads_first(q: ct.Array, hkv: int) -> ct.Array:
  """float[B, T, H, Dh] -> float[B, Hkv, G * T, Dh]: each kv head's G query heads and T
  queries as the rows of one matrix, so the scores are one batched matmul per kv head (the
  attention's forward ~3x quicker than batching over the group axis too on a 2-core
  AVX512-BF16 CPU; benchmarks/profile_stage2.py)."""
  b, t, h, d = q.shape
  return q.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, -1, d)


def attention_probs(q: ct.Array, k: ct.Array, mask: ct.Array, scale: float, *,
                    kv_heads_first: bool = False) -> ct.Array:
  """The grouped-query attention probabilities (softmax in float32).

  Args:
    q: float[B, T, H, Dh]; k: float[B, S, Hkv, Dh] with H a multiple of Hkv (float[B, Hkv,
      S, Dh] with `kv_heads_first`, the cache's layout).
    mask: bool[B, T, S].
    scale: multiplies the scores.

  Returns:
    float32[B, Hkv, H // Hkv, T, S]: head h = kv head h // (H // Hkv), group h % (H // Hkv).
    A query row with no visible key (a padding query) is uniform over all S keys.
  """
  b, t, h, _ = q.shape
  k = k.astype(q.dtype) if kv_heads_first else k.astype(q.dtype).transpose(0, 2, 1, 3)
  hkv = k.shape[1]                                                           # [B, Hkv, S, Dh]
  scores = jnp.einsum("bkqd,bksd->bkqs", _heads_first(q, hkv), k,
                      preferred_element_type=jnp.float32) * scale
  scores = scores.reshape(b, hkv, h // hkv, t, -1)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  return _softmax(scores)


def dot_product_attention(q: ct.Array, k: ct.Array, v: ct.Array, mask: ct.Array,
                          scale: float, *, kv_heads_first: bool = False) -> ct.Array:
  """Grouped-query attention.

  Args:
    q: float[B, T, H, Dh]; k, v: float[B, S, Hkv, Dh] with H a multiple of Hkv (float[B,
      Hkv, S, Dh] with `kv_heads_first`, the cache's layout).
    mask: bool[B, T, S].
    scale: multiplies the scores.

  Returns:
    float[B, T, H, Dh] in q's dtype; softmax in float32.
  """
  b, t, h, d = q.shape
  probs = attention_probs(q, k, mask, scale, kv_heads_first=kv_heads_first).astype(q.dtype)
  hkv = probs.shape[1]
  v = v.astype(q.dtype) if kv_heads_first else v.astype(q.dtype).transpose(0, 2, 1, 3)
  out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, hkv, -1, probs.shape[-1]), v)
  return out.reshape(b, hkv, h // hkv, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Attention(nn.Module):
  """Self-attention with optional rotary embeddings, GQA and a per-layer KV cache.

  Attributes:
    num_heads: H; num_kv_heads: Hkv (divides H); head_dim: Dh.
    qkv_bias: biases on q/k/v; out_bias: bias on the output projection.
    query_scale: score multiplier (None = Dh^-0.5).
    use_rotary: rotate q and k with the cos/sin passed in.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  out_bias: bool = False
  query_scale: float | None = None
  use_rotary: bool = True
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32
  matmul_dtype: ct.DType | None = None   # see DenseGeneral
  lora_rank: int = 0                     # adapter rank of the projections in lora_targets
  lora_alpha: float = 16.0               #   (DenseGeneral.lora_rank / lora_alpha)
  lora_targets: tuple[str, ...] = ()     # of "q", "k", "v", "o"

  @nn.compact
  def __call__(self, x: ct.Array, mask: ct.Array, cos_sin: tuple[ct.Array, ct.Array] | None = None,
               layer_cache: Cache | None = None, end: ct.Array | None = None
               ) -> tuple[ct.Array, Cache | None]:
    """x float[B, T, E], mask bool[B, T, S] -> (float[B, T, E], updated {"k", "v"} or None)."""
    base = dict(dtype=self.dtype, param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype)

    def kw(name):
      rank = self.lora_rank if name in self.lora_targets else 0
      return dict(base, name=name, lora_rank=rank, lora_alpha=self.lora_alpha)

    e = x.shape[-1]
    q = DenseGeneral((self.num_heads, self.head_dim), (ct.EMBED, ct.HEADS, ct.KV),
                     use_bias=self.qkv_bias, **kw("q"))(x)
    k = DenseGeneral((self.num_kv_heads, self.head_dim), (ct.EMBED, ct.HEADS, ct.KV),
                     use_bias=self.qkv_bias, **kw("k"))(x)
    v = DenseGeneral((self.num_kv_heads, self.head_dim), (ct.EMBED, ct.HEADS, ct.KV),
                     use_bias=self.qkv_bias, **kw("v"))(x)
    if self.use_rotary:
      cos, sin = cos_sin
      q = rotary.apply_rotary(q, cos, sin)
      k = rotary.apply_rotary(k, cos, sin)
    q = nn.with_logical_constraint(q, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_HEADS, None))
    new_cache = None
    scale = self.query_scale if self.query_scale is not None else self.head_dim ** -0.5
    if layer_cache is None:
      out = dot_product_attention(q, k, v, mask, scale)
    else:                               # the T new slots written heads-first at [end, end + T)
      put = lambda c, x: lax.dynamic_update_slice(c, x.transpose(0, 2, 1, 3).astype(c.dtype),
                                                  (0, 0, end, 0))
      new_cache = {"k": put(layer_cache["k"], k), "v": put(layer_cache["v"], v)}
      if isinstance(end, int) and end == 0:
        # A cache known to be empty (a prefill: end is the Python 0): the T new slots are
        # the only ones a query can see, so it attends over those, not the whole window.
        out = dot_product_attention(q, k, v, mask[:, :, :x.shape[1]], scale)
      else:
        out = dot_product_attention(q, new_cache["k"], new_cache["v"], mask, scale,
                                    kv_heads_first=True)
    out = nn.with_logical_constraint(out, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_HEADS, None))
    y = DenseGeneral((e,), (ct.HEADS, ct.KV, ct.EMBED), num_contract=2, use_bias=self.out_bias,
                     **kw("o"))(out)
    return y, new_cache
