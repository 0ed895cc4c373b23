"""KV-cache decoding for the decoders of `models/llm` (candidate scoring: `scoring.py`).

* `generate`: batched left-padded prompts (token ids, or `inputs_embeds` for soft prompts)
  are prefilled once into a KV cache; a `lax.while_loop` then decodes one token per step
  (greedy, or temperature + top-p sampling), with transformers' repetition penalty and
  per-row EOS stopping, until `max_new_tokens` or until every row has stopped.
* `prefill` / `decode_loop`: the two halves, which `scoring.rank_and_generate_fn` shares
  with the candidate scoring of the same prompts.

Compilation is bounded: prompts are left-padded to a multiple of `prompt_bucket` (64 by
default) and the decoding options (temperature, top-p, penalty, EOS ids) are traced values,
so one run compiles one program per (batch, prompt bucket, max_new_tokens, ids-or-embeds,
number of EOS ids).

The decode loop runs inside the one compiled program: the KV cache is created, filled and
updated in place (`dynamic_update_slice` on the while-loop carry) without leaving the
device, so there is no per-token host sync, no per-step dispatch and nothing to donate.
Every step attends over the whole fixed window [0, P + N) with the mask hiding empty slots.

Repetition penalty semantics (transformers' `RepetitionPenaltyLogitsProcessor`, v5):
the tokens "seen" are the prompt's real token ids (padding ignored) plus every generated
token; a seen token's logit is divided by the penalty when positive, multiplied when
negative. When only `inputs_embeds` are given there are no prompt ids and, as in
transformers, only the generated tokens are penalised (A-LLMRec stage 2 is this case).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import common_types as ct

Array = ct.Array
PyTree = ct.PyTree

DEFAULT_PROMPT_BUCKET = 64


class GenerateOutput(NamedTuple):
  """Result of `generate`.

  tokens: int32[B, N] generated ids; `pad_id` after a row's EOS (the EOS itself is kept).
  lengths: int32[B] generated tokens per row, EOS included (N where no EOS came).
  """
  tokens: Array
  lengths: Array


def bucket_length(n: int, multiple: int = DEFAULT_PROMPT_BUCKET) -> int:
  """Smallest multiple of `multiple` that is >= n (and >= multiple)."""
  return max(multiple, int(math.ceil(n / multiple)) * multiple)


# ---------------------------------------------------------------------------------------
# Helpers shared by generation and scoring.


def _init_cache(module: Any, batch: int, max_len: int, dtype: Any) -> PyTree:
  """An empty KV cache {"layers": ({"k","v"}: [B,Hkv,S,Dh], ...), "end": int32[]}."""
  return module.init_cache(batch, max_len, dtype)


def variables_of(params: PyTree) -> PyTree:
  """Accepts the "params" collection itself or a variables dict {"params": ...}."""
  if isinstance(params, Mapping) and "params" in params:
    return params
  return {"params": params}


def cache_dtype(module: Any, params: PyTree) -> Any:
  dtype = getattr(getattr(module, "config", None), "dtype", None)
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.result_type(*jax.tree.leaves(params)[:1])


def left_align(mask: Array, *arrays: Array | None) -> tuple[Array, ...]:
  """Moves each row's masked-out slots to the left, keeping real tokens in order.

  Args:
    mask: int32[B, L] (1 = real token), any padding side.
    *arrays: [B, L, ...] arrays (or None) reordered like the mask.

  Returns:
    (mask, *arrays), left-padded.
  """
  order = jnp.argsort(mask > 0, axis=1, stable=True)   # False (pad) first, stable
  out = [jnp.take_along_axis(mask, order, axis=1)]
  for a in arrays:
    if a is None:
      out.append(None)
    else:
      idx = order.reshape(order.shape + (1,) * (a.ndim - 2))
      out.append(jnp.take_along_axis(a, idx, axis=1))
  return tuple(out)


def prefill(module: Any, params: PyTree, ids: Array | None, embeds: Array | None,
             mask: Array, cache_len: int, dtype: Any) -> tuple[Array, Array, PyTree]:
  """Runs a left-padded prompt into a fresh cache of `cache_len` slots.

  Returns:
    (window int32[B, cache_len] with the prompt mask in slots [0, P), last hidden
    float[B, E] of the prompt (slot P-1), the cache with end = P).
  """
  b, p = mask.shape
  # end = the Python 0: the layers know statically that the cache is empty and attend over
  # the prompt's P slots only (layers/attention.py), not over the whole window.
  cache = {**_init_cache(module, b, cache_len, dtype), "end": 0}
  window = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(mask)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  _, aux = module.apply(params, input_ids=ids, inputs_embeds=embeds, attention_mask=window,
                        positions=positions, cache=cache, compute_logits=False)
  return window, aux["hidden"][:, -1], {**aux["cache"], "end": jnp.asarray(p, jnp.int32)}


def lm_logits(module: Any, params: PyTree, hidden: Array) -> Array:
  return module.apply(params, hidden, method=module.logits).astype(jnp.float32)


def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
  """transformers' repetition penalty: seen tokens' logits /penalty if > 0, *penalty if < 0.

  Args:
    logits: float[B, V].
    seen: bool[B, V] tokens in the prompt ids or generated so far.
  """
  penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalised, logits)


def top_p_filter(logits: Array, top_p: float) -> Array:
  """Keeps the smallest most-likely set of tokens whose probability reaches `top_p`.

  Same rule as transformers' `TopPLogitsWarper`: with probabilities sorted ascending, a
  token is removed when the cumulative probability up to and including it is
  <= 1 - top_p; the most likely token is always kept. Removed logits become -inf.
  """
  if isinstance(top_p, (int, float)) and top_p >= 1.0:
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)                        # ascending
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  remove = cum <= (1.0 - top_p)
  remove = remove.at[..., -1].set(False)
  # Threshold = the smallest kept logit; ties at the threshold are kept.
  num_removed = jnp.sum(remove, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(sorted_logits, num_removed, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


# ---------------------------------------------------------------------------------------
# Generation.


def decode_loop(module: Any, params: PyTree, cache: PyTree, window: Array, first_logits: Array,
            seen: Array, n_valid: Array, p: int, n: int, eos: Array, options: dict,
            rng: Array, pad_id: int) -> GenerateOutput:
  """The decoding loop after a prefill: N tokens at slots [p, p + N) of the cache.

  Args:
    cache: KV cache of p + N slots whose prompt fills [0, p) (end = p).
    window: int32[B, p + N] with the prompt mask in [0, p), zeros after.
    first_logits: float32[B, V] the prompt's next-token logits.
    seen: bool[B, V] the repetition-penalty set so far (prompt ids).
    n_valid: int32[B] real prompt tokens per row (the next position).
  """
  b = window.shape[0]
  rows = jnp.arange(b)
  temperature, top_p = options["temperature"], options["top_p"]
  penalty = options["repetition_penalty"]

  def sample(logits, key):
    logits = logits / temperature
    logits = jax.lax.cond(top_p < 1.0, lambda x: top_p_filter(x, top_p), lambda x: x, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

  def greedy(logits, key):
    del key
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def select(logits, seen, done, t):
    logits = jax.lax.cond(penalty != 1.0,
                          lambda x: apply_repetition_penalty(x, seen, penalty),
                          lambda x: x, logits)
    tok = jax.lax.cond(temperature > 0.0, sample, greedy, logits,
                       jax.random.fold_in(rng, t))
    return jnp.where(done, pad_id, tok).astype(jnp.int32)

  def record(tokens, lengths, done, seen, tok, t):
    tokens = tokens.at[:, t].set(tok)
    lengths = jnp.where(done, lengths, t + 1)
    done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
    seen = seen.at[rows, tok].set(True)
    return tokens, lengths, done, seen

  tokens = jnp.full((b, n), pad_id, jnp.int32)
  lengths = jnp.zeros((b,), jnp.int32)
  done = jnp.zeros((b,), jnp.bool_)
  tok = select(first_logits, seen, done, 0)
  tokens, lengths, done, seen = record(tokens, lengths, done, seen, tok, 0)

  def cond(state):
    t, _, _, _, _, _, done, _ = state
    return (t < n) & ~jnp.all(done)

  def body(state):
    t, tok, cache, window, tokens, lengths, done, seen = state
    window = window.at[:, p + t - 1].set(1)
    positions = (n_valid + t - 1)[:, None]
    _, aux = module.apply(params, input_ids=tok[:, None], attention_mask=window,
                          positions=positions, cache=cache, compute_logits=False)
    logits = lm_logits(module, params, aux["hidden"][:, -1])
    tok = select(logits, seen, done, t)
    tokens, lengths, done, seen = record(tokens, lengths, done, seen, tok, t)
    return t + 1, tok, aux["cache"], window, tokens, lengths, done, seen

  state = (jnp.int32(1), tok, cache, window, tokens, lengths, done, seen)
  state = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(tokens=state[4], lengths=state[5])


def prompt_seen(input_ids: Array | None, mask: Array, vocab: int) -> Array:
  """bool[B, V]: the prompt's real token ids (the repetition-penalty set); none for embeds."""
  b = mask.shape[0]
  seen = jnp.zeros((b, vocab), jnp.bool_)
  if input_ids is not None:
    ids = jnp.where(mask > 0, input_ids, vocab)                    # pads -> dropped
    seen = seen.at[jnp.arange(b)[:, None], ids].set(True, mode="drop")
  return seen


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "pad_id"))
def _generate_jit(params, input_ids, inputs_embeds, attention_mask, eos, options, rng, *,
                  module, max_new_tokens, pad_id):
  """The whole generation as one program; sampling options are traced (no recompiles).

  eos: int32[K] stop ids (-1 = none). options: float32 scalars "temperature", "top_p",
  "repetition_penalty".
  """
  params = variables_of(params)
  mask = attention_mask.astype(jnp.int32)
  mask, input_ids, inputs_embeds = left_align(mask, input_ids, inputs_embeds)
  p = mask.shape[1]
  n = max_new_tokens
  dtype = cache_dtype(module, params)
  window, last_hidden, cache = prefill(module, params, input_ids, inputs_embeds, mask,
                                        p + n, dtype)
  logits = lm_logits(module, params, last_hidden)                    # [B, V]
  seen = prompt_seen(input_ids, mask, logits.shape[-1])
  n_valid = jnp.sum(mask, axis=1).astype(jnp.int32)
  return decode_loop(module, params, cache, window, logits, seen, n_valid, p, n, eos, options,
                 rng, pad_id)


def generate(module: Any, params: PyTree, *, input_ids: Array | np.ndarray | None = None,
             inputs_embeds: Array | None = None, attention_mask: Array | np.ndarray,
             max_new_tokens: int, eos_id: int | Sequence[int] | None, pad_id: int,
             temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             rng: ct.PRNGKey | None = None,
             prompt_bucket: int = DEFAULT_PROMPT_BUCKET) -> GenerateOutput:
  """Generates up to `max_new_tokens` tokens per row with a KV cache.

  Args:
    module: a decoder of `models/llm` (LlamaDecoder, OPTDecoder).
    params: its "params" collection (as `load_llm` returns it) or {"params": ...}.
    input_ids: int32[B, P] prompt ids, or None when `inputs_embeds` is given.
    inputs_embeds: float[B, P, E] prompt embeddings (e.g. with spliced soft tokens).
    attention_mask: int32[B, P], 1 = real token; any padding side (rows are left-aligned).
    max_new_tokens: N, the number of decoding steps at most.
    eos_id: an id or ids that end a row (kept in the output); None = never stop early.
    pad_id: written after a row's EOS.
    temperature: 0 = greedy (argmax); > 0 = sampling from softmax(logits / temperature).
    top_p: nucleus filtering when sampling (1.0 = off).
    repetition_penalty: transformers' penalty over prompt ids (if given) + generated ids.
    rng: PRNGKey for sampling (required when temperature > 0).
    prompt_bucket: P is left-padded to a multiple of this to bound recompilation.

  Returns:
    GenerateOutput(tokens int32[B, N], lengths int32[B]).
  """
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("generate: pass exactly one of input_ids / inputs_embeds")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
  if repetition_penalty <= 0:
    raise ValueError(f"generate: repetition_penalty must be > 0, got {repetition_penalty}")
  if temperature > 0 and rng is None:
    raise ValueError("generate: sampling (temperature > 0) needs rng")
  lead = input_ids if input_ids is not None else inputs_embeds
  b, p = lead.shape[:2]
  if tuple(attention_mask.shape) != (b, p):
    raise ValueError(f"generate: attention_mask shape {tuple(attention_mask.shape)} != "
                     f"prompt shape {(b, p)}")
  pb = bucket_length(p, prompt_bucket) if prompt_bucket else p
  extra = pb - p
  mask = jnp.pad(jnp.asarray(attention_mask, jnp.int32), ((0, 0), (extra, 0)))
  if input_ids is not None:
    input_ids = jnp.pad(jnp.asarray(input_ids, jnp.int32), ((0, 0), (extra, 0)),
                        constant_values=pad_id)
  else:
    inputs_embeds = jnp.pad(jnp.asarray(inputs_embeds), ((0, 0), (extra, 0), (0, 0)))
  if rng is None:
    rng = jax.random.PRNGKey(0)
  eos, options = generation_options(eos_id, temperature, top_p, repetition_penalty)
  return _generate_jit(params, input_ids, inputs_embeds, mask, eos, options, rng,
                       module=module, max_new_tokens=int(max_new_tokens), pad_id=int(pad_id))


# ---------------------------------------------------------------------------------------
# Scoring.


def generation_options(eos_id: int | Sequence[int] | None, temperature: float = 0.0,
                       top_p: float = 1.0, repetition_penalty: float = 1.0
                       ) -> tuple[Array, dict]:
  """(eos int32[K] with -1 = none, {"temperature", "top_p", "repetition_penalty"} scalars)
  as the jitted decoders take them (traced: changing them does not recompile)."""
  if eos_id is None:
    eos_ids = [-1]
  elif isinstance(eos_id, (int, np.integer)):
    eos_ids = [int(eos_id)]
  else:
    eos_ids = [int(e) for e in eos_id] or [-1]
  options = {k: jnp.float32(v) for k, v in (("temperature", temperature), ("top_p", top_p),
                                            ("repetition_penalty", repetition_penalty))}
  return jnp.asarray(eos_ids, jnp.int32), options
