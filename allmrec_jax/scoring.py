"""Candidate-likelihood scoring against a KV cache, for the decoders of `models/llm`.

* `score_continuations`: each row's prompt is run once into a cache; the C continuations
  of the row are scored in one packed pass against that cache (an explicit attention
  pattern keeps the continuations apart; no per-continuation cache copies). The packed
  length is bounded by `packed_length`, so one run compiles few programs.
* `rank_and_generate_fn`: the scoring and `generate.generate`'s decoding of the same
  prompts from one prefill of the prompt (the stage-2 evaluation ranks the candidates and
  generates an answer for the same prompts).

The prefill, the cache and the decoding loop are `generate.py`'s.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import common_types as ct
from allmrec_jax import generate as generate_lib

Array = ct.Array
PyTree = ct.PyTree


def _right_align_continuations(cont_ids: Array, cont_mask: Array) -> tuple[Array, Array]:
  """Moves each continuation's real tokens first (in order); pads become id 0."""
  cmask = cont_mask.astype(jnp.int32)
  order = jnp.argsort(cmask == 0, axis=-1, stable=True)
  cmask = jnp.take_along_axis(cmask, order, axis=-1)
  ids = jnp.where(cmask > 0, jnp.take_along_axis(cont_ids.astype(jnp.int32), order, axis=-1), 0)
  return ids, cmask


def _pack(ids: Array, cmask: Array, packed_len: int) -> tuple[Array, Array, Array]:
  """Lays each row's k right-aligned continuations back to back in `packed_len` slots.

  Returns (ids int32[B, Lp], segment int32[B, Lp] = the continuation of each slot or -1
  for an empty slot, offset int32[B, Lp] = the token's index inside its continuation).
  Tokens beyond `packed_len` are dropped (callers size Lp to fit: `packed_length`).
  """
  b, k, t = ids.shape
  lens = jnp.sum(cmask, axis=-1)                                    # [B, k]
  start = jnp.cumsum(lens, axis=-1) - lens
  tok = jnp.arange(t)
  dest = jnp.where(cmask > 0, start[..., None] + tok, packed_len)   # [B, k, T]
  rows = jnp.arange(b)[:, None, None]
  put = lambda fill, val: jnp.full((b, packed_len), fill, jnp.int32).at[rows, dest].set(
      val, mode="drop")
  seg = jnp.broadcast_to(jnp.arange(k)[None, :, None], (b, k, t))
  return put(0, ids), put(-1, seg), put(0, jnp.broadcast_to(tok, (b, k, t)))


def _packed_pattern(window: Array, p: int, segment: Array) -> Array:
  """bool[B, Lp, S]: packed slot i (cache slot p + i) sees the prompt's real slots and the
  slots j <= i of its own continuation; nothing of the other continuations."""
  b, lp = segment.shape
  s = window.shape[1]
  idx = jnp.arange(lp)
  own = ((segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
         & (idx[None, None, :] <= idx[None, :, None]))             # [B, Lp, Lp]
  prompt = jnp.broadcast_to((window[:, None, :p] > 0), (b, lp, p))
  rest = jnp.zeros((b, lp, s - p - lp), bool)
  return jnp.concatenate([prompt, own, rest], axis=-1)


def _score_packed(module: Any, params: PyTree, cache: PyTree, window: Array,
                  logp_first: Array, n_valid: Array, p: int, packed_len: int, ids: Array,
                  cmask: Array) -> Array:
  """Sum of token log-probs float32[B, k] of k right-aligned continuations per row, run
  back to back as one packed pass of `packed_len` tokens against the prompt's cache (no
  per-continuation cache copies, no padding inside the pass: the pattern keeps the
  continuations apart)."""
  b, k, _ = ids.shape
  pids, seg, off = _pack(ids, cmask, packed_len)
  _, aux = module.apply(params, input_ids=pids, attention_mask=_packed_pattern(window, p, seg),
                        positions=n_valid[:, None] + off, cache=cache, compute_logits=False)
  # Slot i's token is predicted by slot i - 1, or by the prompt for a continuation's first:
  # its logit minus the logsumexp (no [B, Lp, V] log-softmax array is written).
  logits = generate_lib.lm_logits(module, params, aux["hidden"][:, :-1])
  from_prev = (jnp.take_along_axis(logits, pids[:, 1:, None], axis=-1)[..., 0]
               - jax.nn.logsumexp(logits, axis=-1))
  from_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), from_prev], axis=1)
  from_prompt = jnp.take_along_axis(logp_first, pids, axis=-1)      # [B, Lp]
  token_logp = jnp.where(off == 0, from_prompt, from_prev) * (seg >= 0)
  dest = jnp.where(seg >= 0, seg, k)
  return jnp.zeros((b, k), jnp.float32).at[jnp.arange(b)[:, None], dest].add(
      token_logp, mode="drop")


def _score_all(module, params, cache, window, logp_first, n_valid, p, ids, cmask,
               candidates_per_pass, packed_len):
  """Scores C continuations in passes of k (lax.map over groups; empty ones pad the last)."""
  b, c, t = ids.shape
  k = c if not candidates_per_pass else min(int(candidates_per_pass), c)
  run = functools.partial(_score_packed, module, params, cache, window, logp_first, n_valid,
                          p, packed_len)
  if k == c:
    return run(ids, cmask)
  groups = -(-c // k)
  extra = groups * k - c                                           # empty continuations
  ids_g = jnp.pad(ids, ((0, 0), (0, extra), (0, 0))).reshape(b, groups, k, t)
  cmask_g = jnp.pad(cmask, ((0, 0), (0, extra), (0, 0))).reshape(b, groups, k, t)
  out = jax.lax.map(lambda xs: run(*xs),
                    (ids_g.transpose(1, 0, 2, 3), cmask_g.transpose(1, 0, 2, 3)))
  return out.transpose(1, 0, 2).reshape(b, groups * k)[:, :c]


def packed_length(cont_mask: np.ndarray, candidates_per_pass: int | None = None,
                  multiple: int = 32) -> int:
  """The smallest `packed_len` (a multiple of `multiple`) that holds every pass's real
  continuation tokens of every row, for int[B, C, T] `cont_mask` (host side)."""
  m = np.asarray(cont_mask) > 0
  c = m.shape[1]
  k = c if not candidates_per_pass else min(int(candidates_per_pass), c)
  groups = -(-c // k)
  m = np.pad(m, ((0, 0), (0, groups * k - c), (0, 0)))
  need = int(m.reshape(m.shape[0], groups, -1).sum(-1).max(initial=0))
  return max(multiple, -(-need // multiple) * multiple)


def _pass_length(c: int, t: int, candidates_per_pass: int | None,
                 packed_len: int | None) -> int:
  if packed_len:
    return int(packed_len)
  k = c if not candidates_per_pass else min(int(candidates_per_pass), c)
  return k * t


def score_continuations_fn(module: Any, params: PyTree, prompt_ids: Array | None,
                           prompt_embeds: Array | None, prompt_mask: Array,
                           cont_ids: Array, cont_mask: Array,
                           candidates_per_pass: int | None = None,
                           packed_len: int | None = None) -> tuple[Array, Array]:
  """Traceable body of `score_continuations` (call it inside your own jit)."""
  params = generate_lib.variables_of(params)
  pmask = prompt_mask.astype(jnp.int32)
  pmask, prompt_ids, prompt_embeds = generate_lib.left_align(pmask, prompt_ids, prompt_embeds)
  p = pmask.shape[1]
  _, c, t = cont_ids.shape
  ids, cmask = _right_align_continuations(cont_ids, cont_mask)
  dtype = generate_lib.cache_dtype(module, params)
  lp = _pass_length(c, t, candidates_per_pass, packed_len)
  window, last_hidden, cache = generate_lib.prefill(module, params, prompt_ids, prompt_embeds, pmask,
                                        p + lp, dtype)
  logp_first = jax.nn.log_softmax(generate_lib.lm_logits(module, params, last_hidden), axis=-1)  # [B, V]
  n_valid = jnp.sum(pmask, axis=1)
  sum_logprob = _score_all(module, params, cache, window, logp_first, n_valid, p, ids,
                           cmask, candidates_per_pass, lp)
  num_tokens = jnp.sum(cmask, axis=-1).astype(jnp.int32)
  return sum_logprob, num_tokens


def rank_and_generate_fn(module: Any, params: PyTree, prompt_ids: Array | None,
                         prompt_embeds: Array | None, prompt_mask: Array, cont_ids: Array,
                         cont_mask: Array, eos: Array, options: dict, rng: Array, *,
                         max_new_tokens: int, pad_id: int,
                         candidates_per_pass: int | None = None,
                         packed_len: int | None = None
                         ) -> tuple[Array, Array, generate_lib.GenerateOutput]:
  """`score_continuations` and `generate` of the same prompts with ONE prompt generate_lib.prefill.

  The prompt fills a cache once; the continuations are scored against it (packed pass),
  then decoding starts from the same cache (the continuation slots are overwritten).
  Traceable (call inside your own jit); `eos`, `options` and `rng` as `generate` builds
  them (`generation_options`).

  Returns:
    (sum_logprob float32[B, C], num_tokens int32[B, C], generate_lib.GenerateOutput).
  """
  params = generate_lib.variables_of(params)
  pmask = prompt_mask.astype(jnp.int32)
  pmask, prompt_ids, prompt_embeds = generate_lib.left_align(pmask, prompt_ids, prompt_embeds)
  b, p = pmask.shape
  _, c, t = cont_ids.shape
  n = int(max_new_tokens)
  ids, cmask = _right_align_continuations(cont_ids, cont_mask)
  dtype = generate_lib.cache_dtype(module, params)
  lp = _pass_length(c, t, candidates_per_pass, packed_len)
  width = max(lp, n)
  window, last_hidden, cache = generate_lib.prefill(module, params, prompt_ids, prompt_embeds, pmask,
                                        p + width, dtype)
  logits = generate_lib.lm_logits(module, params, last_hidden)                    # [B, V]
  n_valid = jnp.sum(pmask, axis=1).astype(jnp.int32)
  sum_logprob = _score_all(module, params, cache, window, jax.nn.log_softmax(logits, -1),
                           n_valid, p, ids, cmask, candidates_per_pass, lp)
  num_tokens = jnp.sum(cmask, axis=-1).astype(jnp.int32)
  # Decoding needs p + n slots only: the prompt's cache, cut to that window.
  gen_cache = {"layers": jax.tree.map(lambda x: x[:, :, :p + n], cache["layers"]),
               "end": cache["end"]}
  gen_window = window[:, :p + n]
  seen = generate_lib.prompt_seen(prompt_ids, pmask, logits.shape[-1])
  out = generate_lib.decode_loop(module, params, gen_cache, gen_window, logits, seen, n_valid, p, n, eos,
                options, rng, pad_id)
  return sum_logprob, num_tokens, out


_score_jit = jax.jit(score_continuations_fn, static_argnums=(0, 7, 8))


def score_continuations(module: Any, params: PyTree, *, prompt_ids: Array | None = None,
                        prompt_embeds: Array | None = None, prompt_mask: Array,
                        cont_ids: Array, cont_mask: Array,
                        candidates_per_pass: int | None = None) -> tuple[Array, Array]:
  """Log-likelihood of C continuations per prompt, the prompt run once per row.

  The prompt fills a KV cache once; the real tokens of a row's C continuations are then
  laid back to back (no padding between them) in the slots that follow it and run as one
  batched pass with an explicit attention pattern (each token sees the prompt and the
  earlier tokens of its own continuation only), or in passes of `candidates_per_pass`
  continuations against the same prompt cache to bound memory. The packed length is the
  longest row's token count rounded up to 32 (`packed_length`). Token j of a continuation is scored by
  log p(cont[j] | prompt, cont[:j]).

  Args:
    module, params: a decoder of `models/llm` and its "params" collection (or
      {"params": ...}).
    prompt_ids: int32[B, P], or None when `prompt_embeds` (float[B, P, E]) is given.
    prompt_mask: int32[B, P], 1 = real token, any padding side.
    cont_ids: int32[B, C, T] continuation ids.
    cont_mask: int32[B, C, T], 1 = real token (a row's real tokens are taken in order).
    candidates_per_pass: None = all C continuations in one pass; k = passes of k per row
      (`lax.map`; the last pass is padded with empty continuations).

  Returns:
    (sum_logprob float32[B, C], num_tokens int32[B, C]); rank by sum / num_tokens for the
    length-normalised score. An empty continuation scores 0 with 0 tokens.
  """
  if (prompt_ids is None) == (prompt_embeds is None):
    raise ValueError("score_continuations: pass exactly one of prompt_ids / prompt_embeds")
  lead = prompt_ids if prompt_ids is not None else prompt_embeds
  if tuple(prompt_mask.shape) != tuple(lead.shape[:2]):
    raise ValueError(f"score_continuations: prompt_mask shape {tuple(prompt_mask.shape)} "
                     f"!= prompt shape {tuple(lead.shape[:2])}")
  if cont_ids.ndim != 3 or tuple(cont_mask.shape) != tuple(cont_ids.shape):
    raise ValueError(f"score_continuations: cont_ids {tuple(cont_ids.shape)} and cont_mask "
                     f"{tuple(cont_mask.shape)} must both be [B, C, T]")
  if cont_ids.shape[0] != lead.shape[0]:
    raise ValueError(f"score_continuations: batch of cont_ids {cont_ids.shape[0]} != "
                     f"prompt batch {lead.shape[0]}")
  if candidates_per_pass is not None and candidates_per_pass < 1:
    raise ValueError(f"score_continuations: candidates_per_pass={candidates_per_pass} must "
                     "be >= 1 (or None = all at once)")
  packed = packed_length(np.asarray(cont_mask), candidates_per_pass)
  return _score_jit(module, params, prompt_ids, prompt_embeds, jnp.asarray(prompt_mask),
                    jnp.asarray(cont_ids), jnp.asarray(cont_mask), candidates_per_pass,
                    packed)
