"""Feed-forward blocks: gated (SwiGLU, Llama) and plain two-layer (OPT)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax.layers.linears import DenseGeneral, activation


def _dense_kw(mlp: nn.Module):
  """name -> the DenseGeneral arguments of that projection of `mlp` (an adapter rank only
  when the name is in mlp.lora_targets)."""
  base = dict(use_bias=mlp.use_bias, dtype=mlp.dtype, param_dtype=mlp.param_dtype,
              matmul_dtype=mlp.matmul_dtype, lora_alpha=mlp.lora_alpha)
  return lambda name: dict(base, name=name,
                           lora_rank=mlp.lora_rank if name in mlp.lora_targets else 0)


class GatedMlp(nn.Module):
  """down(act(gate(x)) * up(x)).

  Attributes:
    hidden_dim: F.
    act: activation name ("silu").
    use_bias: biases on all three projections.
    lora_rank, lora_alpha, lora_targets: LoRA adapters on the projections named in
      lora_targets ("gate", "up", "down"; DenseGeneral.lora_rank / lora_alpha).
  """
  hidden_dim: int
  act: str = "silu"
  use_bias: bool = False
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32
  matmul_dtype: ct.DType | None = None   # see DenseGeneral
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: ct.Array) -> ct.Array:
    """float[B, T, E] -> float[B, T, E]."""
    kw = _dense_kw(self)
    e = x.shape[-1]
    gate = DenseGeneral((self.hidden_dim,), (ct.EMBED, ct.MLP), **kw("gate"))(x)
    up = DenseGeneral((self.hidden_dim,), (ct.EMBED, ct.MLP), **kw("up"))(x)
    h = activation(self.act)(gate) * up
    h = nn.with_logical_constraint(h, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_HEADS))
    return DenseGeneral((e,), (ct.MLP, ct.EMBED), **kw("down"))(h)


class Mlp(nn.Module):
  """fc2(act(fc1(x))).

  Attributes:
    hidden_dim: F.
    act: activation name ("relu" for OPT).
    use_bias: biases on both projections.
    lora_rank, lora_alpha, lora_targets: LoRA adapters on the projections named in
      lora_targets ("fc1", "fc2"; DenseGeneral.lora_rank / lora_alpha).
  """
  hidden_dim: int
  act: str = "relu"
  use_bias: bool = True
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32
  matmul_dtype: ct.DType | None = None   # see DenseGeneral
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: ct.Array) -> ct.Array:
    """float[B, T, E] -> float[B, T, E]."""
    kw = _dense_kw(self)
    e = x.shape[-1]
    h = activation(self.act)(DenseGeneral((self.hidden_dim,), (ct.EMBED, ct.MLP), **kw("fc1"))(x))
    h = nn.with_logical_constraint(h, (ct.ACT_BATCH, ct.ACT_LEN, ct.ACT_HEADS))
    return DenseGeneral((e,), (ct.MLP, ct.EMBED), **kw("fc2"))(h)
