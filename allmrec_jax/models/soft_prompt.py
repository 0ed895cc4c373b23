"""Splicing soft tokens into the frozen LLM's input embeddings (stage 2 and inference).

The A-LLMRec soft prompt: [U] = F_U(x_u) at `user_pos`, and every item slot holds
F_I(e_item) of its item. Everything is a vectorised scatter over fixed shapes; unused
slots point one past the end of the sequence and are dropped by the scatter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from allmrec_jax import common_types as ct


def splice(embeds: jax.Array, user_pos: jax.Array, user_vec: jax.Array | None,
           item_pos: jax.Array, item_vecs: jax.Array | None) -> jax.Array:
  """Writes soft tokens into token embeddings.

  Args:
    embeds: float[B, L, E] token embeddings (E = the LLM's config.embed_dim, before any
      project_in).
    user_pos: int32[B] or int32[B, U] positions of the [U] slots (L = none); every slot
      gets the same vector.
    user_vec: float[B, E] projected user representation, or None (no user token: the
      slot keeps its token embedding — the "w/o user representation" ablation).
    item_pos: int32[B, S] item-slot positions (L = unused).
    item_vecs: float[B, S, E] projected item embeddings, or None.
  Returns:
    float[B, L, E].
  """
  b, width = embeds.shape[0], embeds.shape[-1]
  for name, vec in (("item", item_vecs), ("user", user_vec)):
    if vec is not None and vec.shape[-1] != width:
      raise ValueError(f"{name} soft tokens are {vec.shape[-1]} wide but the LLM's input "
                       f"embeddings are {width} wide: build the projectors with the LLM's "
                       "config.embed_dim")
  rows = jnp.arange(b)
  if item_vecs is not None:
    embeds = embeds.at[rows[:, None], item_pos].set(item_vecs.astype(embeds.dtype),
                                                     mode="drop")
  if user_vec is not None:
    user_pos = user_pos.reshape(b, -1)
    vec = jnp.broadcast_to(user_vec[:, None], (b, user_pos.shape[1], user_vec.shape[-1]))
    embeds = embeds.at[rows[:, None], user_pos].set(vec.astype(embeds.dtype), mode="drop")
  return embeds


def soft_prompt_embeds(llm: Any, llm_params: ct.PyTree, projectors: Any,
                       proj_params: ct.PyTree, item_table: jax.Array,
                       batch: dict[str, jax.Array], *, use_user: bool = True,
                       use_items: bool = True) -> jax.Array:
  """Token embeddings of a PromptBatch with the projected soft tokens spliced in.

  Args:
    llm: the decoder module (has `embed`).
    llm_params: {"params": ...} of the frozen LLM.
    projectors: a `Stage2Projectors` module.
    proj_params: {"params": ...} of the projectors (trainable).
    item_table: float[N+1, K] the item embeddings fed to F_I (joint, text or CF table).
    batch: `input_ids`, `user_pos`, `item_pos`, `item_ids`, `user_rep` float[B, D].
    use_user / use_items: ablation switches (False = keep the slot's token embedding).
  Returns:
    float[B, L, E].
  """
  embeds = llm.apply(llm_params, batch["input_ids"], method=llm.embed)
  user_vec = item_vecs = None
  if use_user:
    user_vec = projectors.apply(proj_params, batch["user_rep"], method=projectors.user)
  if use_items:
    item_vecs = projectors.apply(proj_params, item_table[batch["item_ids"]],
                                 method=projectors.item)
  return splice(embeds, batch["user_pos"], user_vec, batch["item_pos"], item_vecs)
