"""LoRA adapters of a frozen decoder (the "lora" collection of layers/linears.DenseGeneral).

A decoder built with `lora_rank > 0` and `lora_targets` (the attention projections q, k, v,
o of every family; the MLP projections gate, up, down of the Llama family, fc1, fc2 of OPT)
reads adapters only when its variables carry a "lora" collection, so one loaded module
serves the frozen LLM (LLM-Only, the paper's A-LLMRec) and the adapted one. A trainer keeps
the adapters in its trainable tree as `trainable["lora"]` beside the projectors'
`trainable["params"]`.

Written here rather than taken from qwix (0.1.8): qwix's LoraProvider intercepts
`lax.dot_general` on a module's parameter and works on this package's float32 path, but the
bfloat16-operand path (linears.low_precision_dense, a custom_vjp over a cast kernel) is not
intercepted, so the adapters would silently vanish on accelerator configs; the adapter here
is ~20 lines inside DenseGeneral and covers every matmul path, remat and the logical-axis
sharding of the base kernels.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allmrec_jax import common_types as ct
from allmrec_jax import config_lib


ATTENTION_TARGETS = ("q", "k", "v", "o")          # every decoder's attention projections
MLP_TARGETS = {"llama": ("gate", "up", "down"),   # SwiGLU (layers/mlp.GatedMlp)
               "opt": ("fc1", "fc2")}             # ReLU FFN (layers/mlp.Mlp)
TARGETS = ATTENTION_TARGETS + tuple(n for names in MLP_TARGETS.values() for n in names)


def targets_of(family: str) -> tuple[str, ...]:
  """The projections a decoder family can adapt: attention, then its MLP's."""
  return ATTENTION_TARGETS + MLP_TARGETS[family]


def parse_targets(spec: str | tuple[str, ...], family: str | None = None
                  ) -> tuple[str, ...]:
  """"q,v" -> ("q", "v"); a name that is no projection (of `family`'s decoder, when given)
  raises ValueError naming the field."""
  names = tuple(config_lib.as_list(spec))
  allowed = TARGETS if family is None else targets_of(family)
  bad = [t for t in names if t not in allowed]
  if bad:
    of = "" if family is None else f" of a {family} decoder"
    shown = spec if isinstance(spec, str) else ",".join(names)
    raise ValueError(f"--config.llm.lora_targets={shown!r}: unknown projection(s) {bad}{of} "
                     f"(choose from {', '.join(allowed)})")
  return names


def init_adapters(llm: nn.Module, llm_params: ct.PyTree, rng: jax.Array) -> ct.PyTree:
  """The boxed (nn.LogicallyPartitioned) "lora" collection of `llm` (A random, B zero).

  Raises ValueError when the decoder has no adapter targets (lora_rank 0 or no targets)."""
  c = llm.config
  if not (c.lora_rank and c.lora_targets):
    raise ValueError(f"the LLM has no LoRA targets (lora_rank={c.lora_rank}, "
                     f"lora_targets={c.lora_targets}); set config.llm.lora_rank and "
                     "config.llm.lora_targets")
  ids = jnp.zeros((1, 1), jnp.int32)
  _, out = llm.apply(llm_params, input_ids=ids, compute_logits=False, mutable=["lora"],
                     rngs={"params": rng})
  return out["lora"]


def with_adapters(llm_params: ct.PyTree, trainable: ct.PyTree | None) -> ct.PyTree:
  """The decoder's variables for a forward pass: the frozen `{"params": ...}` plus the
  adapters of `trainable` (its "lora" entry) when it has them."""
  if trainable is not None and "lora" in trainable:
    return {**llm_params, "lora": trainable["lora"]}
  return llm_params
