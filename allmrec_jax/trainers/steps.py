"""The one training-step shape of every stage (CF, stage 1, stage 2).

  train_step(state, frozen, batch, rng) -> (state, metrics)

  state:   {"params": the trainable tree, "opt_state": its optax state, "step": int32[]};
           donated to the step.
  frozen:  what the step reads and never updates (stage 1: the CF tables and SBERT inputs;
           stage 2: the LLM's parameters and the item table fed to F_I; CF: nothing).
  batch:   the step's arrays, sharded over the mesh's data axes.
  rng:     a PRNG key; stages with dropout derive the step's key from it and state["step"].
  metrics: {"train/<name>": float[]}.

`compile_step` jits such a step once per trainer with the state's and the frozen tree's
shardings declared for inputs and outputs (MaxText's `train.py` pattern) and the state
donated; the batch keeps the sharding it was placed with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
StepFn = Callable[[dict, PyTree, dict, jax.Array], tuple[dict, dict]]


def new_state(params: PyTree, opt_state: PyTree, step: int | jax.Array = 0) -> dict:
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}


def shardings_of(tree: PyTree) -> PyTree:
  """The committed sharding of every array leaf (None for host values: left to jit)."""
  return jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, tree)


def compile_step(step_fn: StepFn, state: dict, frozen: PyTree) -> StepFn:
  """jit(step_fn) with the shardings of `state` and `frozen` (placed on the mesh already)
  declared as in/out shardings, the batch's and the key's taken as they come, the state
  donated. The returned function has the same signature."""
  state_sh, frozen_sh = shardings_of(state), shardings_of(frozen)
  return jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, None, None),
                 out_shardings=(state_sh, None), donate_argnums=(0,))
