"""Stage-2 projectors: CF/joint embeddings -> soft tokens of the frozen LLM.

  F_I = Linear(latent -> E) -> LayerNorm -> GELU      -> Linear(E -> E)   (items)
  F_U = Linear(D -> E)      -> LayerNorm -> LeakyReLU -> Linear(E -> E)   (user)

Linear weights are xavier-normal (the paper's code), biases zero; LayerNorm eps 1e-5 and
GELU exact (erf) as torch's defaults; LeakyReLU slope 0.01.

E is the width of the LLM's input embeddings (`config.embed_dim`), the space the soft
tokens are spliced into: the hidden width for Llama and most OPTs, the narrower word-embedding
width for an OPT with project_in/project_out (OPT-350m: 512, hidden 1,024).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from allmrec_jax import common_types as ct


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  in_dim: int          # latent width (items) or CF width D (user)
  out_dim: int         # LLM input-embedding width E (config.embed_dim)
  activation: str      # "gelu" | "leaky_relu"
  dtype: ct.DType = jnp.float32


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.01),
}


class Projector(nn.Module):
  """float[..., in_dim] -> float[..., out_dim]."""
  config: ProjectorConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    if cfg.activation not in _ACTIVATIONS:
      raise ValueError(f"projector activation {cfg.activation!r} unknown; "
                       f"known: {sorted(_ACTIVATIONS)}")
    dense = lambda n, name, axes: nn.Dense(
        n, name=name, dtype=cfg.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))
    x = dense(cfg.out_dim, "fc1", (ct.LATENT, ct.EMBED))(x.astype(cfg.dtype))
    x = nn.LayerNorm(epsilon=1e-5, name="norm", dtype=jnp.float32,
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, (ct.EMBED,)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (ct.EMBED,))
                     )(x.astype(jnp.float32))
    x = _ACTIVATIONS[cfg.activation](x).astype(cfg.dtype)
    return dense(cfg.out_dim, "fc2", (ct.EMBED, ct.EMBED))(x)


def ItemProjector(latent_dim: int, llm_dim: int, dtype=jnp.float32) -> Projector:  # pylint: disable=invalid-name
  return Projector(ProjectorConfig(latent_dim, llm_dim, "gelu", dtype))


def UserProjector(cf_dim: int, llm_dim: int, dtype=jnp.float32) -> Projector:  # pylint: disable=invalid-name
  return Projector(ProjectorConfig(cf_dim, llm_dim, "leaky_relu", dtype))


class Stage2Projectors(nn.Module):
  """The trainable tree of stage 2: {"user_proj": F_U, "item_proj": F_I}."""
  item_in_dim: int     # width of the item table fed to F_I (latent 128; CF D for MLP-LLM)
  user_in_dim: int     # CF width D
  llm_dim: int         # E: the LLM's input-embedding width (config.embed_dim)
  dtype: ct.DType = jnp.float32

  def setup(self):
    self.item_proj = ItemProjector(self.item_in_dim, self.llm_dim, self.dtype)
    self.user_proj = UserProjector(self.user_in_dim, self.llm_dim, self.dtype)

  def item(self, x: jax.Array) -> jax.Array:
    """float[..., K] -> float[..., E]."""
    return self.item_proj(x)

  def user(self, x: jax.Array) -> jax.Array:
    """float[..., D] -> float[..., E]."""
    return self.user_proj(x)

  def __call__(self, item_x: jax.Array, user_x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.item(item_x), self.user(user_x)
