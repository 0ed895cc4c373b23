"""Llama-family decoder (Llama 2/3, SmolLM, TinyLlama, Mistral, Qwen2, ...): RMSNorm, RoPE,
GQA, SwiGLU; optional q/k/v biases (Qwen2) and a sliding attention window (Mistral).

Parameter tree (flax names; kernels are [in..., out...]):
  embed/embedding                       [V, E]        (vocab, embed)
  layers_{i}/attn_norm/scale            [E]
  layers_{i}/attn/{q,k,v}/kernel        [E, H|Hkv, Dh] (embed, heads, kv)
  layers_{i}/attn/o/kernel              [H, Dh, E]    (heads, kv, embed)
  layers_{i}/mlp_norm/scale             [E]
  layers_{i}/mlp/{gate,up}/kernel       [E, F]        (embed, mlp)
  layers_{i}/mlp/down/kernel            [F, E]        (mlp, embed)
  final_norm/scale                      [E]
  lm_head/kernel                        [E, V]        (embed, vocab; untied models only)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.layers import attention as attn_lib
from allmrec_jax.layers import rotary
from allmrec_jax.layers.linears import DenseGeneral, Embed
from allmrec_jax.layers.mlp import GatedMlp
from allmrec_jax.layers.norms import RMSNorm
from allmrec_jax.models import lora as lora_lib


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static shape/behaviour of a Llama-family decoder."""
  vocab_size: int
  hidden_size: int                    # E
  intermediate_size: int              # F
  num_layers: int
  num_heads: int                      # H
  num_kv_heads: int                   # Hkv (GQA when < H)
  head_dim: int                       # Dh
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False        # biases on q/k/v/o
  qkv_bias: bool = False              # biases on q/k/v only (Qwen2)
  sliding_window: int | None = None   # key j visible from query i iff i - j < window (Mistral)
  mlp_bias: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str = "float32"              # compute dtype
  param_dtype: str = "float32"
  matmul_dtype: str = ""              # "" = dtype; "bfloat16" = dense/head matmul operands in
                                      #   bfloat16, float32 accumulation (linears.py)
  remat: bool = False                 # rematerialise each layer (stage-2 training)
  lora_rank: int = 0                  # LoRA adapters on the projections in lora_targets
  lora_alpha: float = 16.0            #   ("q", "k", "v", "o", "gate", "up", "down"), used only
  lora_targets: tuple[str, ...] = ()  #   when a "lora" collection is passed (linears.py)

  family = "llama"

  def __post_init__(self):
    lora_lib.parse_targets(self.lora_targets, self.family)   # a projection of this family

  @classmethod
  def from_hf(cls, hf: Any, **overrides) -> LlamaConfig:
    """From a transformers LlamaConfig (or any config with the same fields)."""
    scaling = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None)
    theta = getattr(hf, "rope_theta", None)
    if scaling:
      scaling = dict(scaling)
      theta = scaling.pop("rope_theta", theta)
      kind = scaling.get("rope_type", scaling.get("type", "default"))
      scaling["rope_type"] = kind
      scaling.pop("type", None)
      if kind not in rotary.SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={kind!r} is not supported "
                         f"(supported: {', '.join(rotary.SUPPORTED_ROPE_TYPES)})")
      scaling = None if kind == "default" else tuple(sorted(scaling.items()))
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    model_type = getattr(hf, "model_type", "llama")
    window = None
    if model_type == "mistral":
      window = getattr(hf, "sliding_window", None)
    elif getattr(hf, "use_sliding_window", False):
      raise ValueError(f"{model_type}: use_sliding_window=True is not supported")
    kw = dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
        num_heads=num_heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps,
        rope_theta=float(theta if theta is not None else 10000.0), rope_scaling=scaling,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf, "attention_bias", False)),
        qkv_bias=model_type == "qwen2", sliding_window=window,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        hidden_act=getattr(hf, "hidden_act", "silu"),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_ids(getattr(hf, "eos_token_id", None)),
        pad_token_id=getattr(hf, "pad_token_id", None))
    kw.update(overrides)
    return cls(**kw)

  @property
  def embed_dim(self) -> int:
    """Width of `embed()` / `inputs_embeds`."""
    return self.hidden_size


class LlamaBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, mask, cos_sin, layer_cache=None, end=None):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    mm = dict(kw, matmul_dtype=c.matmul_dtype or None)
    h = RMSNorm(c.rms_norm_eps, name="attn_norm", **kw)(x)
    h, new_cache = attn_lib.Attention(
        c.num_heads, c.num_kv_heads, c.head_dim, qkv_bias=c.attention_bias or c.qkv_bias,
        out_bias=c.attention_bias, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
        lora_targets=tuple(c.lora_targets), name="attn", **mm)(h, mask, cos_sin, layer_cache,
                                                               end)
    x = x + h
    h = RMSNorm(c.rms_norm_eps, name="mlp_norm", **kw)(x)
    x = x + GatedMlp(c.intermediate_size, c.hidden_act, c.mlp_bias, lora_rank=c.lora_rank,
                     lora_alpha=c.lora_alpha, lora_targets=tuple(c.lora_targets), name="mlp",
                     **mm)(h)
    x = nn.with_logical_constraint(x, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_EMBED))
    return x, new_cache


class LlamaDecoder(nn.Module):
  """Llama-family causal LM. See docs/INTERFACES.md ("LLMs") for the call contract."""
  config: LlamaConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    mm = dict(kw, matmul_dtype=c.matmul_dtype or None)
    self.embedder = Embed(c.vocab_size, c.hidden_size, name="embed", **mm)
    block = nn.remat(LlamaBlock) if c.remat else LlamaBlock
    self.layers = [block(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, name="final_norm", **kw)
    if not c.tie_word_embeddings:
      self.lm_head = DenseGeneral((c.vocab_size,), (ct.EMBED, ct.VOCAB), name="lm_head", **mm)
    scaling = dict(c.rope_scaling or ())
    self._inv_freq = rotary.static_inv_freq(c.rope_theta, c.head_dim, scaling or None)

  def embed(self, input_ids: ct.Array) -> ct.Array:
    """int[B, T] -> float[B, T, E] token embeddings (the width `inputs_embeds` takes)."""
    return self.embedder(input_ids)

  def logits(self, hidden: ct.Array) -> ct.Array:
    """float[..., E] (after the final norm) -> float32[..., V]."""
    if self.config.tie_word_embeddings:
      return self.embedder.attend(hidden)
    return self.lm_head(hidden).astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> attn_lib.Cache:
    return init_cache(self.config, batch, max_len, dtype)

  def _inv_freq_for(self, positions):
    c = self.config
    scaling = dict(c.rope_scaling or ())
    if scaling.get("rope_type") == "dynamic":
      return rotary.dynamic_inv_freq(c.rope_theta, c.head_dim, float(scaling["factor"]),
                                     c.max_position_embeddings, jnp.max(positions) + 1)
    return self._inv_freq

  def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None,
               cache=None, compute_logits=True, deterministic=True):
    """Runs T tokens; returns (float32[B, T, V] logits or None, {"hidden", "cache"}).

    `deterministic` is accepted for a uniform surface (the decoder has no dropout).
    """
    del deterministic
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(c.dtype))
    b, t = x.shape[:2]
    mask, positions = attn_lib.mask_and_positions(attention_mask, b, t, cache, positions,
                                                  c.sliding_window)
    cos_sin = rotary.rotary_cos_sin(positions, self._inv_freq_for(positions))
    x = nn.with_logical_constraint(x, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_EMBED))
    end = None if cache is None else cache["end"]
    new_layers = []
    for i, layer in enumerate(self.layers):
      x, lc = layer(x, mask, cos_sin, None if cache is None else cache["layers"][i], end)
      new_layers.append(lc)
    x = self.final_norm(x)
    new_cache = None if cache is None else {"layers": tuple(new_layers), "end": end + t}
    logits = self.logits(x) if compute_logits else None
    return logits, {"hidden": x, "cache": new_cache}


def init_cache(config, batch: int, max_len: int, dtype=None) -> attn_lib.Cache:
  """Empty KV cache for any decoder config with num_layers / num_kv_heads / head_dim."""
  dtype = jnp.dtype(dtype if dtype is not None else config.dtype)
  return attn_lib.init_kv_cache(config.num_layers, batch, max_len, config.num_kv_heads,
                                config.head_dim, dtype)
