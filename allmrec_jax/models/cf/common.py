"""Pieces shared by every CF backbone: the frozen config, initialisers, the common surface.

Every backbone is a `flax.linen.Module` with `setup()` and these methods (call them with
`model.apply(params, ..., method=...)`):
  encode(seq, deterministic)            -> float[B, L, D]  state at every position
  item_embeddings()                     -> float[N+1, D]   the item table E (row 0 = padding)
  user_representation(seq, deterministic) -> float[B, D]  state at the last position
  score(seq, items, deterministic)      -> float[B, C]     score of each item for each user
  __call__(seq, pos, neg, deterministic) -> (float[B, L], float[B, L]) training logits
Sequences are left-padded int32[B, L] with 0 = padding, so the last position is the most
recent item.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from allmrec_jax import common_types as ct

Array = ct.Array


@dataclasses.dataclass(frozen=True)
class CFConfig:
  """Frozen model configuration of every CF backbone (built from `config.cf`)."""
  model: str = "sasrec"          # registry key
  num_items: int = 0             # N; the item table has N+1 rows, row 0 = padding
  maxlen: int = 50               # L (positions table of SASRec)
  hidden_dim: int = 50           # D
  num_blocks: int = 2            # SASRec attention blocks
  num_heads: int = 1             # SASRec heads
  dropout: float = 0.5           # dropout rate
  conv_blocks: int = 5           # NextItNet residual blocks (each: dilations d, 2d)
  dilations: tuple[int, ...] = (1, 4)  # NextItNet dilation cycle (RecBole default)
  kernel_size: int = 3           # NextItNet causal conv width
  mlp_layers: int = 2            # NCF MLP tower depth (2D -> D -> D/2 ...)


# Kang & McAuley / pmixer init: torch.nn.init.xavier_normal_ (plain normal, fan_avg).
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def torch_default_bias(fan_in: int):
  """torch Linear/Conv1d default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def padded_table_init(base=xavier_normal):
  """`base` init with row 0 (padding) zeroed, as pmixer does after xavier init."""
  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype).at[0].set(0.0)
  return init


def logical(init, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, axes)


def layer_norm(eps: float = 1e-8, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, name=name,
                      scale_init=logical(nn.initializers.ones, (ct.NORM,)),
                      bias_init=logical(nn.initializers.zeros, (ct.NORM,)))


def dense(features: int, fan_in: int, in_axis: str, out_axis: str, name: str | None = None,
          use_bias: bool = True, kernel_init=xavier_normal, bias_init=None) -> nn.Dense:
  """Dense with logical axes (in_axis, out_axis); bias torch-default unless given."""
  bias_init = bias_init if bias_init is not None else torch_default_bias(fan_in)
  return nn.Dense(features, use_bias=use_bias, name=name,
                  kernel_init=logical(kernel_init, (in_axis, out_axis)),
                  bias_init=logical(bias_init, (out_axis,)))


class CFSurface(nn.Module):
  """Base module: the common surface built from `encode`, `item_table` and `score_states`.

  Subclasses define `setup`, `encode(seq, deterministic) -> float[B, L, D]` and
  `item_table() -> float[N+1, D]`; `score_states` defaults to a dot product.
  """
  config: CFConfig

  def item_embeddings(self) -> Array:
    """float[N+1, D]: the item table E (row 0 = padding)."""
    return self.item_table()

  def score_states(self, states: Array, items: Array) -> Array:
    """Scores float[...] of items int32[...] against states float[..., D] (dot product)."""
    emb = jnp.take(self.item_table(), items, axis=0)
    return jnp.sum(states * emb, axis=-1)

  def user_representation(self, seq: Array, deterministic: bool = True) -> Array:
    """x_u float[B, D]: the state at the last position of the left-padded seq int32[B, L]."""
    return self.encode(seq, deterministic=deterministic)[:, -1, :]

  def score(self, seq: Array, items: Array, deterministic: bool = True) -> Array:
    """float[B, C]: scores of items int32[B, C] (C may be N+1 for full ranking)."""
    user = self.user_representation(seq, deterministic=deterministic)
    return self.score_users(user, items)

  def score_users(self, user: Array, items: Array) -> Array:
    """float[B, C] from user states float[B, D] and items int32[B, C] or int32[C]."""
    if items.ndim == 1:
      return self.score_states(user[:, None, :], items[None, :])
    return self.score_states(user[:, None, :], items)

  def __call__(self, seq: Array, pos: Array, neg: Array,
               deterministic: bool = True) -> tuple[Array, Array]:
    """Training logits (float[B, L], float[B, L]) of pos / neg int32[B, L] at every position."""
    states = self.encode(seq, deterministic=deterministic)
    return self.score_states(states, pos), self.score_states(states, neg)


def timeline_mask(seq: Array) -> Array:
  """float[B, L, 1]: 1 at real items, 0 at padding."""
  return (seq != 0).astype(jnp.float32)[..., None]


def item_embed(num_items: int, dim: int, name: str = "item_emb") -> nn.Embed:
  """The item table (ITEMS, EMBED), xavier-normal, padding row zeroed."""
  return nn.Embed(num_items + 1, dim, name=name,
                  embedding_init=logical(padded_table_init(), (ct.ITEMS, ct.EMBED)))


def to_cf_config(cf: Any, num_items: int) -> CFConfig:
  """CFConfig from a `config.cf` ConfigDict (or mapping) and the number of items."""
  get = cf.get if hasattr(cf, "get") else (lambda k, d=None: getattr(cf, k, d))
  fields = {f.name for f in dataclasses.fields(CFConfig)}
  kwargs = {k: get(k) for k in fields if k != "num_items" and get(k) is not None}
  if "dilations" in kwargs:
    kwargs["dilations"] = tuple(int(x) for x in kwargs["dilations"])
  if num_items <= 0:
    raise ValueError(f"make_cf_model: num_items must be > 0, got {num_items}")
  return CFConfig(num_items=int(num_items), **kwargs)
