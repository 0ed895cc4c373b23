r"""Where do the answer positions of stage-2 prompts look, and how large is each slot? Does
the answer attend to the target's [C] more than to the other candidates' [C]?

  JAX_PLATFORMS=cpu .venv/bin/python -m experiments.inspect_soft_prompt \
      --config=configs/ml100k_long.py --workdir=runs/ml100k [--name=stage2] \
      [--random_projectors | --no_lora] [--user_index=0] [--num_users=1] [--batch_size=4] \
      [--split=valid] [--config.llm.matmul_dtype= ...]

Builds the evaluation prompts of --num_users validation users from number --user_index on
(the seeded prompt order of `eval_lib.make_eval_set`, the stored candidates and
`config.eval.num_history` history items) with each target's answer appended (right
padding), splices the soft tokens ([U] = F_U(x_u), [H]/[C] = F_I(item)) and runs the LLM
once per prompt (--batch_size prompts a pass, no generation), reading with Flax method
interceptors (`run_with_intermediates`) the residual stream at every layer's input (and
after the last layer) and every attention layer's per-head probabilities (the outputs are
unchanged).

What runs (the "projectors" and "adapters" fields of the output):
  trained        the projectors of `<workdir>/<name>/ckpt` (read-only, as saved, whatever
                 step it reached) and, when the run trains LoRA (config.stage2.train_lora)
                 and the checkpoint holds adapters, the LLM with those adapters (the decoder
                 built with config.llm.lora_rank / lora_alpha / lora_targets);
  --no_lora      the trained projectors through the frozen LLM (what the adapters do is the
                 difference to the run above);
  --random_projectors  fresh projectors (seed config.seed) and no adapters: before training
                 (also what runs when there is no checkpoint).

Prints the prompt(s) it read, then two plain-text tables, one row per layer l (numbers
averaged over the users; the first table's last row, "out", is the residual after the last
layer):
  norm_*      mean L2 norm of the residual stream entering layer l at: position 0 (the first
              token), the [U] slot(s), the [H] slots, the [C] slots, the ordinary text tokens;
  mass_*      the attention mass of layer l (head-averaged probabilities, averaged over the
              answer positions `target_pos` where `target_mask`) on those key groups: pos0,
              [U], [H], [C], the target candidate's own [C] slot (tgtC, a part of C) and the
              rest (every other key);
and, against chance = 1 / number of candidates (printed above the second table):
  tgtC_share  mass on the target's [C] / mass on all [C] slots (head-averaged), the mean
              over users of each user's ratio;
  tgtC_rank1  the fraction of users whose target [C] gets more (head-averaged) mass than
              every other candidate's [C];
  copy_head   the head with the largest tgtC_share of layer l (per-head shares averaged
              over users), its share (copy_share) and its tgtC_rank1 (copy_rank1);
then one JSON line with the same numbers (null where a group is empty), the per-head shares
`head_share` [layer][head] and the standard error of tgtC_share over users.

Why: position 0 of a causal LM is an attention sink (a huge-norm residual that most heads
park their probability on; its content is not read), so a soft token there is invisible,
and a soft token whose norm is far from the text tokens' may be ignored or swamp a layer.
The mass columns show whether the answer positions read [U] and the [C] slots at all; the
share columns whether they single out the target's [C] (the collaborative signal being
copied into the answer), before and after training, with and without the adapters.

Groups are disjoint: position 0 counts only as pos0 (with `--config.stage2.bos=none` it is
also the [U] slot), and text = every other valid position (the answer tokens included).
An experiment tool; it writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
import inspect
import json
import math
import pathlib
import re
from typing import Any
import warnings

from absl import app
from absl import flags
import flax.linen as nn
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import checkpointing
from allmrec_jax.layers import attention
from allmrec_jax.layers import linears
from allmrec_jax.layers import rotary
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.models import soft_prompt

NORM_GROUPS = ("pos0", "U", "H", "C", "text")
MASS_GROUPS = ("pos0", "U", "H", "C", "tgtC", "rest")
SHARE_FIELDS = ("tgtC_share", "tgtC_rank1", "copy_head", "copy_share", "copy_rank1")

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a script: tests import the module)."""
  flags.DEFINE_string("workdir", None, "a run's workdir with finished cf/ and stage1/",
                      required=True)
  config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)
  flags.DEFINE_string("name", "stage2", "projectors from <workdir>/<name>/ckpt when present")
  flags.DEFINE_bool("random_projectors", False,
                    "fresh random projectors (seed config.seed), no adapters")
  flags.DEFINE_bool("no_lora", False,
                    "the checkpoint's projectors through the frozen LLM (its adapters unused)")
  flags.DEFINE_integer("user_index", 0, "the first user of the evaluation set (0-based)")
  flags.DEFINE_integer("num_users", 1, "how many users (from --user_index on) to average")
  flags.DEFINE_integer("batch_size", 4, "prompts per forward pass")
  flags.DEFINE_string("split", "valid", "evaluation split")


# ---------------------------------------------------------------------------- statistics
def _valid_positions(pos: np.ndarray, length: int) -> np.ndarray:
  pos = np.asarray(pos, np.int64).reshape(-1)
  return pos[(pos >= 0) & (pos < length)]


def soft_prompt_stats(norms: np.ndarray, answer_attn: np.ndarray, attention_mask: np.ndarray,
                      user_pos: np.ndarray, hist_pos: np.ndarray, cand_pos: np.ndarray,
                      target_slot: int) -> dict[str, Any]:
  """Per-layer residual norms and answer-position attention of one prompt.

  Args:
    norms: float[L + 1, T] the L2 norm of the residual stream entering each layer, then
      after the last layer.
    answer_attn: float[L, Hq, T] each layer's per-head attention probabilities on each key,
      averaged over the answer positions (`answer_attention`; NaN: no answer position).
    attention_mask: int[T] 1 = real token or soft slot.
    user_pos: int[U] the [U] slot positions (T or negative = none).
    hist_pos: int[H] the [H] slot positions (T or negative = none).
    cand_pos: int[C] the [C] slot positions (T or negative = none).
    target_slot: the target candidate's [C] position (T or negative = none).

  Returns:
    {"norm": {g: [L + 1 floats] for g in NORM_GROUPS},
     "mass": {g: [L floats] for g in MASS_GROUPS} (head-averaged),
     "tgtC_share": [L] tgtC mass / C mass (head-averaged masses),
     "tgtC_rank1": [L] 1.0 where the target's [C] gets more mass than every other [C],
     "head_share": [L][Hq] and "head_rank1": [L][Hq] the same per head,
     "num_candidates": the number of [C] slots};
    NaN where a group is empty (no such slot, no answer position, the target not among
    the [C] slots). Groups are disjoint (position 0 is only pos0; text = the other valid
    positions); tgtC is part of C; pos0 + U + H + C + rest = 1.
  """
  norms = np.asarray(norms, np.float64)
  heads = np.asarray(answer_attn, np.float64)                              # [L, Hq, T]
  n_layers, t = heads.shape[0], heads.shape[-1]
  valid = np.asarray(attention_mask).reshape(-1).astype(bool)
  groups = {g: np.zeros(t, bool) for g in ("pos0", "U", "H", "C", "tgtC")}
  groups["pos0"][0] = True
  for g, pos in (("U", user_pos), ("H", hist_pos), ("C", cand_pos), ("tgtC", [target_slot])):
    groups[g][_valid_positions(pos, t)] = True
  for g in ("U", "H", "C", "tgtC"):
    groups[g] &= ~groups["pos0"] & valid
  groups["text"] = valid & ~(groups["pos0"] | groups["U"] | groups["H"] | groups["C"])

  out_norm = {g: [float(norms[l, groups[g]].mean()) if groups[g].any() else math.nan
                  for l in range(norms.shape[0])] for g in NORM_GROUPS}
  attn = heads.mean(axis=1)                                                # [L, T]
  out_mass = {g: [float(x) for x in attn[:, groups[g]].sum(-1)]
              for g in ("pos0", "U", "H", "C", "tgtC")}
  out_mass["rest"] = [float(1.0 - sum(out_mass[g][l] for g in ("pos0", "U", "H", "C")))
                      for l in range(n_layers)]

  slots = np.nonzero(groups["C"])[0]
  hit = np.nonzero(slots == target_slot)[0]
  nan_l, nan_lh = np.full(n_layers, np.nan), np.full(heads.shape[:2], np.nan)
  share, rank1, head_share, head_rank1 = nan_l, nan_l, nan_lh, nan_lh
  if len(hit) and np.isfinite(attn).all():
    k = int(hit[0])

    def share_and_rank1(m):                                                # m: [..., C]
      tgt, others = m[..., k], np.delete(m, k, axis=-1)
      total = m.sum(-1)
      s = np.where(total > 0, tgt / np.where(total > 0, total, 1.0), np.nan)
      best_other = others.max(-1) if others.shape[-1] else np.full(tgt.shape, -np.inf)
      return s, (tgt > best_other).astype(np.float64)

    share, rank1 = share_and_rank1(attn[:, slots])
    head_share, head_rank1 = share_and_rank1(heads[:, :, slots])
  return {"norm": out_norm, "mass": {g: out_mass[g] for g in MASS_GROUPS},
          "tgtC_share": [float(x) for x in share], "tgtC_rank1": [float(x) for x in rank1],
          "head_share": head_share.tolist(), "head_rank1": head_rank1.tolist(),
          "num_candidates": len(slots)}


def _nanmean(x: np.ndarray, axis: int = 0) -> np.ndarray:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)   # an all-NaN column -> NaN
    return np.nanmean(np.asarray(x, np.float64), axis=axis)


def summarize(per_user: list[dict[str, Any]]) -> dict[str, Any]:
  """The users' `soft_prompt_stats` averaged (NaN entries left out).

  Returns the per-layer lists of `soft_prompt_stats` ("norm", "mass", "tgtC_share",
  "tgtC_rank1") averaged over the users, and:
    tgtC_share_se: [L] the standard error of tgtC_share over the users;
    head_share: [L][Hq] the per-head shares averaged over the users;
    copy_head: [L] the head of largest averaged share (-1: none), copy_share its share,
      copy_rank1 its tgtC_rank1 averaged over the users;
    chance: the mean of 1 / number of candidates (the share and rank-1 rate of a head
      blind to which candidate is the target); num_users.
  """
  def stack(key, sub=None):
    return np.asarray([u[key] if sub is None else u[key][sub] for u in per_user], np.float64)

  out: dict[str, Any] = {
      "norm": {g: _nanmean(stack("norm", g)).tolist() for g in NORM_GROUPS},
      "mass": {g: _nanmean(stack("mass", g)).tolist() for g in MASS_GROUPS}}
  share = stack("tgtC_share")                                              # [N, L]
  n = np.isfinite(share).sum(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)
    sd = np.nanstd(share, axis=0, ddof=1) if len(per_user) > 1 else np.full(n.shape, np.nan)
  out["tgtC_share"] = _nanmean(share).tolist()
  out["tgtC_share_se"] = np.where(n > 1, sd / np.sqrt(np.maximum(n, 1)), np.nan).tolist()
  out["tgtC_rank1"] = _nanmean(stack("tgtC_rank1")).tolist()
  head_share = _nanmean(stack("head_share"))                               # [L, Hq]
  head_rank1 = _nanmean(stack("head_rank1"))
  filled = np.where(np.isfinite(head_share), head_share, -np.inf)
  best = np.where(np.isfinite(head_share).any(-1), filled.argmax(-1), -1)
  rows = np.arange(len(best))
  out["head_share"] = head_share.tolist()
  out["copy_head"] = [int(h) for h in best]
  out["copy_share"] = np.where(best >= 0, head_share[rows, best], np.nan).tolist()
  out["copy_rank1"] = np.where(best >= 0, head_rank1[rows, best], np.nan).tolist()
  counts = np.asarray([u["num_candidates"] for u in per_user], np.float64)
  out["chance"] = float(np.mean(1.0 / counts[counts > 0])) if (counts > 0).any() else math.nan
  out["num_users"] = len(per_user)
  return out


def format_table(stats: dict[str, Any]) -> str:
  """The plain-text tables of `summarize` (or of one `soft_prompt_stats`): norms and masses
  (one row per layer, then "out"), then the target's [C] against the other candidates'."""
  norm, mass = stats["norm"], stats["mass"]
  head = (["layer"] + [f"norm_{g}" for g in NORM_GROUPS] + [f"mass_{g}" for g in MASS_GROUPS])
  lines = [" ".join(f"{h:>10}" for h in head)]
  n_layers = len(mass["pos0"])
  for l in range(n_layers + 1):
    cells = [f"{l if l < n_layers else 'out':>10}"]
    cells += [f"{norm[g][l]:>10.2f}" for g in NORM_GROUPS]
    cells += ([f"{mass[g][l]:>10.4f}" for g in MASS_GROUPS] if l < n_layers
              else [f"{'':>10}"] * len(MASS_GROUPS))
    lines.append(" ".join(cells))
  if "copy_head" not in stats:
    return "\n".join(lines)
  chance = stats["chance"]
  lines += ["", f"target [C] vs the other candidates' [C] over {stats['num_users']} user(s); "
            f"chance (1/num_candidates) = {chance:.4f}",
            " ".join(f"{h:>10}" for h in ("layer",) + SHARE_FIELDS)]
  for l in range(n_layers):
    cells = [f"{l:>10}", f"{stats['tgtC_share'][l]:>10.4f}", f"{stats['tgtC_rank1'][l]:>10.3f}",
             f"{stats['copy_head'][l]:>10}", f"{stats['copy_share'][l]:>10.4f}",
             f"{stats['copy_rank1'][l]:>10.3f}"]
    lines.append(" ".join(cells))
  return "\n".join(lines)


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float):
    return None if math.isnan(x) else round(x, 5)
  return x


# ---------------------------------------------------------------------------- forward pass
def run_with_intermediates(llm, llm_params, embeds: jax.Array, attention_mask: jax.Array,
                           probs_fn: Callable[[jax.Array], jax.Array] | None = None
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One forward pass of the decoder that also returns what it computes on the way: the
  residual stream and each layer's attention probabilities, read by Flax method
  interceptors (`nn.intercept_methods`; the decoder itself has no inspection hooks, and
  its outputs are unchanged).

  Each decoder block's input (and the last block's output) is the residual stream; each
  attention layer's probabilities are recomputed from its q / k projections (rotated like
  the layer's, LoRA adapters included when `llm_params` carries them), its mask and its
  scale.

  Args:
    llm, llm_params: the decoder (built without remat) and {"params": ...} (+ "lora").
    embeds: float[B, T, E] input embeddings; attention_mask: int[B, T].
    probs_fn: maps one layer's per-head probabilities float32[B, Hq, T, T] (query head h
      reads kv head h // (Hq // Hkv)) to what is kept of it (reduced inside the layer, so
      the [B, L, Hq, T, T] tensor is never built); None = the head average float32[B, T, T].

  Returns:
    (float32[B, T, V] logits, float32[B, L + 1, T, E] residual stream at each layer's input
     and after the last layer, [B, L, ...] each layer's `probs_fn` output stacked on axis 1).
  """
  if getattr(llm.config, "remat", False):
    raise ValueError("run_with_intermediates: build the decoder without remat (the values "
                     "read inside a rematerialised layer cannot leave it)")
  if probs_fn is None:
    probs_fn = lambda p: p.mean(axis=1)
  residual, probs, qk = [], [], {}   # residual: each block's input, then the last output

  def interceptor(next_fun, args, kwargs, context):
    module, out = context.module, next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    parent = module.parent
    if isinstance(module, linears.DenseGeneral) and isinstance(parent, attention.Attention):
      qk[module.name] = out                                    # "q", "k", "v", "o"
    elif isinstance(module, attention.Attention):
      call = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
      mask, cos_sin = call.arguments["mask"], call.arguments.get("cos_sin")
      q, k = qk["q"], qk["k"]
      if module.use_rotary:
        q, k = (rotary.apply_rotary(a, *cos_sin) for a in (q, k))
      scale = module.query_scale if module.query_scale is not None else module.head_dim ** -0.5
      p = attention.attention_probs(q, k, mask, scale)          # [B, Hkv, G, T, T]
      probs.append(probs_fn(p.reshape(p.shape[0], -1, *p.shape[3:])))
    elif type(parent) is type(llm) and re.fullmatch(r"layers_\d+", module.name or ""):
      residual[-1:] = [args[0], out[0]]     # the previous block's output is this input
    return out

  with nn.intercept_methods(interceptor):
    logits, _ = llm.apply(llm_params, inputs_embeds=embeds, attention_mask=attention_mask)
  residual = jnp.stack([r.astype(jnp.float32) for r in residual], axis=1)
  return logits, residual, jnp.stack(probs, axis=1)


def answer_attention(probs: jax.Array, target_pos: jax.Array, target_mask: jax.Array
                     ) -> jax.Array:
  """Per-head attention of the answer positions.

  Args:
    probs: float32[B, Hq, T, S] one layer's per-head probabilities [query, key].
    target_pos: int32[B, Tt] the answer (query) positions; target_mask: float[B, Tt].

  Returns:
    float32[B, Hq, S]: the rows of the answer positions averaged with weights target_mask
    (NaN for a prompt without an answer position).
  """
  pos = jnp.clip(target_pos, 0, probs.shape[2] - 1)
  rows = jnp.take_along_axis(probs, pos[:, None, :, None], axis=2)          # [B, Hq, Tt, S]
  w = target_mask.astype(jnp.float32)
  n = w.sum(-1)[:, None, None]
  mean = jnp.einsum("bhqs,bq->bhs", rows, w) / jnp.maximum(n, 1.0)
  return jnp.where(n > 0, mean, jnp.nan)


def inspect_batch(llm, llm_vars, embeds: jax.Array, batch: dict[str, jax.Array]
                  ) -> dict[str, jax.Array]:
  """One forward pass of prompts with their answers appended (jit-able).

  Args:
    llm, llm_vars: the decoder (without remat) and its variables ({"params"}, + "lora").
    embeds: float[B, T, E] the prompts' input embeddings (soft tokens spliced in).
    batch: PromptBatch arrays (`attention_mask`, `target_pos`, `target_ids`, `target_mask`).

  Returns:
    {"norms": float32[B, L + 1, T] residual norms (`run_with_intermediates`),
     "answer_attn": float32[B, L, Hq, T] (`answer_attention` of every layer),
     "tok_logp": float32[B, Tt] log p(answer token | prefix)}.
  """
  logits, residual, attn = run_with_intermediates(
      llm, llm_vars, embeds, batch["attention_mask"],
      probs_fn=lambda p: answer_attention(p, batch["target_pos"], batch["target_mask"]))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  tok_logp = jnp.take_along_axis(
      jnp.take_along_axis(logp, batch["target_pos"][..., None], 1),
      batch["target_ids"][..., None], -1)[..., 0]
  return {"norms": jnp.linalg.norm(residual, axis=-1), "answer_attn": attn,
          "tok_logp": tok_logp}


def run_batches(forward: Callable[[dict[str, jax.Array]], dict[str, jax.Array]],
                arrays: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """`forward` over the rows of `arrays` in batches of `batch_size` (the last one padded
  with copies of its first row, so one shape compiles); its outputs concatenated."""
  n = len(arrays["input_ids"])
  size = max(1, min(int(batch_size), n))
  outs = []
  for start in range(0, n, size):
    idx = np.arange(start, start + size)
    idx = np.where(idx < n, idx, start)
    out = jax.device_get(forward({k: jnp.asarray(v[idx]) for k, v in arrays.items()}))
    outs.append({k: np.asarray(v)[:min(size, n - start)] for k, v in out.items()})
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def prompt_stats(out: dict[str, np.ndarray], arrays: dict[str, np.ndarray],
                 num_history: int, targets: np.ndarray) -> list[dict[str, Any]]:
  """Each prompt's `soft_prompt_stats` from `inspect_batch`'s outputs `out` and the
  PromptBatch `arrays` (item slots: `num_history` [H], then the [C]); targets: int[B] the
  target item of each prompt (its [C] slot is tgtC)."""
  stats = []
  for b in range(len(targets)):
    item_pos, item_ids = arrays["item_pos"][b], arrays["item_ids"][b]
    cand_pos, cand_ids = item_pos[num_history:], item_ids[num_history:]
    hit = np.nonzero(cand_ids == int(targets[b]))[0]
    stats.append(soft_prompt_stats(
        out["norms"][b], out["answer_attn"][b], arrays["attention_mask"][b],
        arrays["user_pos"][b], item_pos[:num_history], cand_pos,
        int(cand_pos[hit[0]]) if len(hit) else -1))
  return stats


def answer_nll(out: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> np.ndarray:
  """float[B] each prompt's mean -log p of its answer tokens."""
  w = arrays["target_mask"] > 0
  return -(out["tok_logp"] * w).sum(-1) / np.maximum(w.sum(-1), 1)


def report(info: dict[str, Any], summary: dict[str, Any]):
  """Prints the run's description, the tables and the JSON line."""
  print(", ".join(f"{k}={v}" for k, v in info.items() if k != "config"))
  if "config" in info:
    print("config:", ", ".join(f"{k}={v}" for k, v in info["config"].items()))
  print(format_table(summary), flush=True)
  print(json.dumps(_jsonable({**info, **summary})), flush=True)


# ---------------------------------------------------------------------------- the script
def _restore_trainable(ckpt: pathlib.Path) -> tuple[dict | None, str]:
  """The trainable tree of a stage-2 checkpoint as saved ({"params": projectors} + "lora"
  when it trains adapters) and where it came from; (None, "random") without one."""
  if not ckpt.is_dir():
    return None, "random"
  manager = checkpointing.make_manager(ckpt, max_to_keep=1, read_only=True)
  restored = checkpointing.restore(manager)
  if restored is None:
    return None, "random"
  trainable = jax.tree.map(jnp.asarray, dict(restored["params"]))
  return trainable, f"{ckpt} step {restored['step']}"


def main(argv):
  del argv
  # Heavy imports here: the test imports this module for its functions only.
  from allmrec_jax.data import prepare  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import cf as cf_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import item_tables as item_tables_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2 as stage2_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2_run  # pylint: disable=import-outside-toplevel
  from allmrec_jax.weights import llm as llm_weights  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  if config is None:
    raise SystemExit("--config is required")
  if FLAGS.random_projectors and FLAGS.no_lora:
    raise SystemExit("--random_projectors already runs without adapters; drop --no_lora")
  if FLAGS.num_users < 1:
    raise SystemExit(f"--num_users={FLAGS.num_users}: must be >= 1")
  cfg = config.stage2
  workdir = pathlib.Path(FLAGS.workdir)
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, FLAGS.workdir, ds)
  cf_vars = {"params": cf_params}
  tables = item_tables_lib.item_tables(config, workdir, ds, cf_model, cf_vars)
  table = item_tables_lib.item_table_for(cfg.item_source, tables, config.seed,
                                         standardize=cfg.item_standardize)
  # As stage2_run.load_llm (the adapters' shape from config.llm), without remat.
  loaded = llm_weights.load_llm(config.llm.path or None, dtype=config.llm.dtype,
                                matmul_dtype=config.llm.matmul_dtype or "",
                                lora_rank=config.llm.lora_rank,
                                lora_alpha=config.llm.lora_alpha,
                                lora_targets=lora_lib.parse_targets(config.llm.lora_targets))
  llm, llm_params = loaded.module, {"params": loaded.params}
  builder = stage2_run.prompt_builder(ds, loaded.tokenizer, cfg)

  es = eval_lib.make_eval_set(ds, FLAGS.split, maxlen=config.data.maxlen,
                              num_history=config.eval.num_history, max_users=0,
                              seed=config.data.candidate_seed)
  first, n_users = FLAGS.user_index, FLAGS.num_users
  if first < 0 or first + n_users > len(es.users):
    raise SystemExit(f"--user_index={first} --num_users={n_users}: the {FLAGS.split} set "
                     f"has {len(es.users)} users")
  es = es.take(np.arange(first, first + n_users))
  user_rep = stage2_lib.user_representations(cf_model, cf_vars, es.seq)

  proj = projectors_lib.Stage2Projectors(table.shape[1], user_rep.shape[1],
                                         loaded.config.embed_dim)
  params = stage2_lib.init_projectors(proj, jax.random.PRNGKey(config.seed), table.shape[1],
                                      user_rep.shape[1])
  trainable, source = (None, "random") if FLAGS.random_projectors else _restore_trainable(
      workdir / FLAGS.name / "ckpt")
  adapters = "none"
  if trainable is not None:
    params = {"params": trainable["params"]}
    if "lora" in trainable and cfg.train_lora:
      adapters = "unused (--no_lora)" if FLAGS.no_lora else "checkpoint"
    elif cfg.train_lora:
      adapters = "none (config.stage2.train_lora, but the checkpoint has none)"
  llm_vars = (lora_lib.with_adapters(llm_params, trainable) if adapters == "checkpoint"
              else llm_params)

  pb = builder.build(es.history, es.prompt_candidates, es.targets, padding="right").arrays()
  pb["user_rep"] = user_rep.astype(np.float32)
  item_table = jnp.asarray(table, jnp.float32)

  @jax.jit
  def forward(proj_params, llm_params, llm_vars, batch):
    embeds = soft_prompt.soft_prompt_embeds(llm, llm_params, proj, proj_params, item_table,
                                            batch, use_user=cfg.use_user,
                                            use_items=cfg.use_items)
    return inspect_batch(llm, llm_vars, embeds, batch)

  out = run_batches(lambda b: forward(params, llm_params, llm_vars, b), pb, FLAGS.batch_size)
  n_hist = es.history.shape[1]
  per_user = prompt_stats(out, pb, n_hist, es.targets)
  summary = summarize(per_user)
  nll = answer_nll(out, pb)
  lengths = pb["attention_mask"].sum(-1)
  info = {"config": {"bos": cfg.bos, "item_slot": cfg.item_slot,
                     "user_at_answer": bool(cfg.user_at_answer),
                     "item_source": cfg.item_source, "use_user": bool(cfg.use_user),
                     "use_items": bool(cfg.use_items), "train_lora": bool(cfg.train_lora),
                     "matmul_dtype": config.llm.matmul_dtype or ""},
          "projectors": source, "adapters": adapters, "split": FLAGS.split,
          "user_index": first, "num_users": n_users,
          "num_candidates": per_user[0]["num_candidates"],
          "answer_nll": round(float(nll.mean()), 4)}
  if n_users == 1:
    item_pos, length = pb["item_pos"][0], int(lengths[0])
    tmask = pb["target_mask"][0] > 0
    target = int(es.targets[0])
    hit = np.nonzero(pb["item_ids"][0][n_hist:] == target)[0]
    info.update({
        "user": int(es.users[0]), "target": target, "target_title": ds.titles[target],
        "length": length, "pos0_token": loaded.tokenizer.convert_ids_to_tokens(
            int(pb["input_ids"][0, 0])),
        "user_pos": [int(p) for p in pb["user_pos"][0] if p < length],
        "num_history_slots": int((item_pos[:n_hist] < length).sum()),
        "target_slot": int(item_pos[n_hist + hit[0]]) if len(hit) else -1,
        "answer_positions": [int(p) for p in pb["target_pos"][0][tmask]]})
  else:
    info.update({"length_mean": round(float(lengths.mean()), 1),
                 "users": [int(u) for u in es.users]})
  report(info, summary)


if __name__ == "__main__":
  define_flags()
  app.run(main)
