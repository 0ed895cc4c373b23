"""OPT decoder (Zhang et al. 2022): learned positions (offset 2), pre- or post-LN, ReLU FFN,
optional project_in/project_out when word_embed_proj_dim != hidden_size, tied LM head.

Parameter tree (flax names; kernels are [in..., out...]):
  embed/embedding                        [V, Ew]       (vocab, embed)   Ew = word_embed_proj_dim
  pos_embed                              [P + 2, E]    (replicated)
  project_in/kernel, project_out/kernel  [Ew, E], [E, Ew]  (only when Ew != E)
  layers_{i}/attn_norm/{scale,bias}      [E]
  layers_{i}/attn/{q,k,v}/{kernel,bias}  [E, H, Dh], [H, Dh]
  layers_{i}/attn/o/{kernel,bias}        [H, Dh, E], [E]
  layers_{i}/mlp_norm/{scale,bias}       [E]
  layers_{i}/mlp/fc1/{kernel,bias}       [E, F], [F]
  layers_{i}/mlp/fc2/{kernel,bias}       [F, E], [E]
  final_norm/{scale,bias}                [E]           (pre-LN models only)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.layers import attention as attn_lib
from allmrec_jax.layers.linears import DenseGeneral, Embed, default_kernel_init
from allmrec_jax.layers.mlp import Mlp
from allmrec_jax.layers.norms import LayerNorm
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models.llm.llama import _ids, init_cache

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """Static shape/behaviour of an OPT decoder."""
  vocab_size: int
  hidden_size: int                    # E
  ffn_dim: int                        # F
  num_layers: int
  num_heads: int
  max_position_embeddings: int = 2048
  word_embed_proj_dim: int | None = None  # Ew (None = E)
  do_layer_norm_before: bool = True   # pre-LN (False: post-LN, OPT-350m)
  final_layer_norm: bool = True       # decoder-level LN (pre-LN models)
  layer_norm_elementwise_affine: bool = True
  enable_bias: bool = True
  activation_function: str = "relu"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  matmul_dtype: str = ""              # "" = dtype; "bfloat16" = dense/head matmul operands in
                                      #   bfloat16, float32 accumulation (linears.py)
  remat: bool = False
  lora_rank: int = 0                  # LoRA adapters on the projections in lora_targets
  lora_alpha: float = 16.0            #   ("q", "k", "v", "o", "fc1", "fc2"), used only when
  lora_targets: tuple[str, ...] = ()  #   a "lora" collection is passed (linears.py)

  family = "opt"
  tie_word_embeddings = True

  def __post_init__(self):
    lora_lib.parse_targets(self.lora_targets, self.family)   # a projection of this family

  @classmethod
  def from_hf(cls, hf: Any, **overrides) -> OPTConfig:
    """From a transformers OPTConfig."""
    pre = bool(getattr(hf, "do_layer_norm_before", True))
    kw = dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, ffn_dim=hf.ffn_dim,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings,
        word_embed_proj_dim=getattr(hf, "word_embed_proj_dim", None) or hf.hidden_size,
        do_layer_norm_before=pre,
        final_layer_norm=pre and not getattr(hf, "_remove_final_layer_norm", False),
        layer_norm_elementwise_affine=bool(getattr(hf, "layer_norm_elementwise_affine", True)),
        enable_bias=bool(getattr(hf, "enable_bias", True)),
        activation_function=getattr(hf, "activation_function", "relu"),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_ids(getattr(hf, "eos_token_id", None)),
        pad_token_id=getattr(hf, "pad_token_id", None))
    kw.update(overrides)
    return cls(**kw)

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def embed_dim(self) -> int:
    """Width of `embed()` / `inputs_embeds` (word_embed_proj_dim)."""
    return self.word_embed_proj_dim or self.hidden_size

  @property
  def has_projections(self) -> bool:
    return self.embed_dim != self.hidden_size


class OPTBlock(nn.Module):
  """One OPT layer, pre-LN or post-LN."""
  config: OPTConfig

  @nn.compact
  def __call__(self, x, mask, cos_sin=None, layer_cache=None, end=None):
    del cos_sin
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    mm = dict(kw, matmul_dtype=c.matmul_dtype or None)
    ln = lambda name: LayerNorm(1e-5, c.layer_norm_elementwise_affine, name=name, **kw)
    attn_norm, mlp_norm = ln("attn_norm"), ln("mlp_norm")
    pre = c.do_layer_norm_before
    h = attn_norm(x) if pre else x
    h, new_cache = attn_lib.Attention(
        c.num_heads, c.num_heads, c.head_dim, qkv_bias=c.enable_bias, out_bias=c.enable_bias,
        use_rotary=False, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
        lora_targets=tuple(c.lora_targets), name="attn", **mm)(h, mask, None, layer_cache, end)
    x = x + h
    if not pre:
      x = attn_norm(x)
    h = mlp_norm(x) if pre else x
    x = x + Mlp(c.ffn_dim, c.activation_function, c.enable_bias, lora_rank=c.lora_rank,
                lora_alpha=c.lora_alpha, lora_targets=tuple(c.lora_targets), name="mlp",
                **mm)(h)
    if not pre:
      x = mlp_norm(x)
    x = nn.with_logical_constraint(x, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_EMBED))
    return x, new_cache


class OPTDecoder(nn.Module):
  """OPT causal LM. See docs/INTERFACES.md ("LLMs") for the call contract."""
  config: OPTConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    mm = dict(kw, matmul_dtype=c.matmul_dtype or None)
    self.embedder = Embed(c.vocab_size, c.embed_dim, name="embed", **mm)
    self.pos_embedding = self.param(
        "pos_embed", nn.with_logical_partitioning(default_kernel_init, (None, None)),  # small: replicated
        (c.max_position_embeddings + POSITION_OFFSET, c.hidden_size), jnp.dtype(c.param_dtype))
    if c.has_projections:
      self.project_in = DenseGeneral((c.hidden_size,), (None, ct.EMBED), name="project_in", **mm)
      self.project_out = DenseGeneral((c.embed_dim,), (ct.EMBED, None), name="project_out", **mm)
    block = nn.remat(OPTBlock) if c.remat else OPTBlock
    self.layers = [block(c, name=f"layers_{i}") for i in range(c.num_layers)]
    if c.final_layer_norm:
      self.final_norm = LayerNorm(1e-5, c.layer_norm_elementwise_affine, name="final_norm", **kw)

  def embed(self, input_ids: ct.Array) -> ct.Array:
    """int[B, T] -> float[B, T, Ew] token embeddings (before project_in)."""
    return self.embedder(input_ids)

  def logits(self, hidden: ct.Array) -> ct.Array:
    """float[..., E] (after the final norm) -> float32[..., V] (project_out, tied head)."""
    if self.config.has_projections:
      hidden = self.project_out(hidden)
    return self.embedder.attend(hidden)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> attn_lib.Cache:
    return init_cache(self.config, batch, max_len, dtype)

  def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None,
               cache=None, compute_logits=True, deterministic=True):
    """Runs T tokens; returns (float32[B, T, V] logits or None, {"hidden", "cache"}).

    positions are 0-based (the offset of 2 is added here); `deterministic` is accepted for a
    uniform surface (the frozen decoder runs without dropout).
    """
    del deterministic
    c = self.config
    dtype = jnp.dtype(c.dtype)
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(dtype)
    b, t = x.shape[:2]
    mask, positions = attn_lib.mask_and_positions(attention_mask, b, t, cache, positions)
    if c.has_projections:
      x = self.project_in(x)
    x = x + jnp.take(self.pos_embedding, positions + POSITION_OFFSET, axis=0).astype(dtype)
    x = nn.with_logical_constraint(x, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_EMBED))
    end = None if cache is None else cache["end"]
    new_layers = []
    for i, layer in enumerate(self.layers):
      x, lc = layer(x, mask, None, None if cache is None else cache["layers"][i], end)
      new_layers.append(lc)
    if c.final_layer_norm:
      x = self.final_norm(x)
    new_cache = None if cache is None else {"layers": tuple(new_layers), "end": end + t}
    logits = self.logits(x) if compute_logits else None
    return logits, {"hidden": x, "cache": new_cache}
