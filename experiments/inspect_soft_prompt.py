r"""Where do the answer positions of ONE stage-2 prompt look, and how large is each slot?

  JAX_PLATFORMS=cpu .venv/bin/python -m experiments.inspect_soft_prompt \
      --config=configs/ml100k_long.py --workdir=runs/ml100k [--name=stage2] \
      [--random_projectors] [--user_index=0] [--split=valid] [--config.llm.matmul_dtype= ...]

Builds the evaluation prompt of validation user number --user_index (the seeded prompt
order of `eval_lib.make_eval_set`, the 20 stored candidates and `config.eval.num_history`
history items) with the target's answer appended (right padding), splices the soft tokens
([U] = F_U(x_u), [H]/[C] = F_I(item)) and runs the frozen LLM once with
`mutable=["intermediates"]`, which makes the decoder sow the residual stream at every
layer's input (and after the last layer) and every attention layer sow its head-averaged
probabilities (allmrec_jax/layers/attention.py; the outputs are unchanged).

The projectors are those of `<workdir>/<name>/ckpt` (restored like
`stage2.train(..., restore_only=True)`, read-only, whatever step it reached), or fresh
random ones (seed `config.seed`) with --random_projectors or when there is no checkpoint.

Prints a plain-text table, one row per layer l (the last row, "out", is the residual after
the last layer):
  norm_*  mean L2 norm of the residual stream entering layer l at: position 0 (the first
          token), the [U] slot(s), the [H] slots, the [C] slots, the ordinary text tokens;
  mass_*  the attention mass (sum of layer l's head-averaged probabilities, averaged over
          the answer positions `target_pos` where `target_mask`) on those key groups: pos0,
          [U], [H], [C], the target candidate's own [C] slot (tgtC, a part of C) and the
          rest (every other key);
then one JSON line with the same numbers (null where a group is empty).

Why: position 0 of a causal LM is an attention sink (a huge-norm residual that most heads
park their probability on; its content is not read), so a soft token there is invisible,
and a soft token whose norm is far from the text tokens' may be ignored or swamp a layer.
The mass columns show whether the answer positions read [U] and the [C] slots at all, and
whether the target's [C] gets more than its 1/20 share of the candidate mass.

Groups are disjoint: position 0 counts only as pos0 (with `--config.stage2.bos=none` it is
also the [U] slot), and text = every other valid position (the answer tokens included).
An experiment tool; it writes nothing.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import checkpointing
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.models import soft_prompt

NORM_GROUPS = ("pos0", "U", "H", "C", "text")
MASS_GROUPS = ("pos0", "U", "H", "C", "tgtC", "rest")

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a script: tests import the module)."""
  flags.DEFINE_string("workdir", None, "a run's workdir with finished cf/ and stage1/",
                      required=True)
  config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)
  flags.DEFINE_string("name", "stage2", "projectors from <workdir>/<name>/ckpt when present")
  flags.DEFINE_bool("random_projectors", False, "fresh random projectors (seed config.seed)")
  flags.DEFINE_integer("user_index", 0, "which user of the evaluation set (0-based)")
  flags.DEFINE_string("split", "valid", "evaluation split")


def _valid_positions(pos: np.ndarray, length: int) -> np.ndarray:
  pos = np.asarray(pos, np.int64).reshape(-1)
  return pos[(pos >= 0) & (pos < length)]


def soft_prompt_stats(residual: np.ndarray, attn: np.ndarray, attention_mask: np.ndarray,
                      user_pos: np.ndarray, hist_pos: np.ndarray, cand_pos: np.ndarray,
                      target_slot: int, target_pos: np.ndarray,
                      target_mask: np.ndarray) -> dict[str, dict[str, list[float]]]:
  """Per-layer residual norms and answer-position attention mass of one prompt.

  Args:
    residual: float[L + 1, T, E] the residual stream entering each layer, then after the
      last layer.
    attn: float[L, T, T] each layer's head-averaged attention probabilities [query, key].
    attention_mask: int[T] 1 = real token or soft slot.
    user_pos: int[U] the [U] slot positions (T or negative = none).
    hist_pos: int[H] the [H] slot positions (T or negative = none).
    cand_pos: int[C] the [C] slot positions (T or negative = none).
    target_slot: the target candidate's [C] position (T or negative = none).
    target_pos: int[Tt] the answer (query) positions; target_mask: float[Tt] which count.

  Returns:
    {"norm": {g: [L + 1 floats] for g in NORM_GROUPS},
     "mass": {g: [L floats] for g in MASS_GROUPS}}; NaN where a group is empty (no such
    slot, or no answer position). Groups are disjoint (position 0 is only pos0; text =
    the other valid positions); tgtC is part of C; pos0 + U + H + C + rest = 1.
  """
  residual = np.asarray(residual, np.float64)
  attn = np.asarray(attn, np.float64)
  t = residual.shape[1]
  valid = np.asarray(attention_mask).reshape(-1).astype(bool)
  groups = {g: np.zeros(t, bool) for g in ("pos0", "U", "H", "C", "tgtC")}
  groups["pos0"][0] = True
  for g, pos in (("U", user_pos), ("H", hist_pos), ("C", cand_pos), ("tgtC", [target_slot])):
    groups[g][_valid_positions(pos, t)] = True
  for g in ("U", "H", "C", "tgtC"):
    groups[g] &= ~groups["pos0"] & valid
  groups["text"] = valid & ~(groups["pos0"] | groups["U"] | groups["H"] | groups["C"])

  norms = np.linalg.norm(residual, axis=-1)                                  # [L+1, T]
  out_norm = {g: [float(norms[l, groups[g]].mean()) if groups[g].any() else math.nan
                  for l in range(norms.shape[0])] for g in NORM_GROUPS}

  tmask = np.asarray(target_mask).reshape(-1) > 0
  queries = np.asarray(target_pos, np.int64).reshape(-1)[tmask]
  rows = attn[:, queries, :]                                                 # [L, Q, T]
  out_mass: dict[str, list[float]] = {}
  for g in ("pos0", "U", "H", "C", "tgtC"):
    m = rows[..., groups[g]].sum(-1).mean(-1) if len(queries) else np.full(len(attn), np.nan)
    out_mass[g] = [float(x) for x in m]
  out_mass["rest"] = [float(1.0 - sum(out_mass[g][l] for g in ("pos0", "U", "H", "C")))
                      if len(queries) else math.nan for l in range(len(attn))]
  return {"norm": out_norm, "mass": {g: out_mass[g] for g in MASS_GROUPS}}


def format_table(stats: dict[str, dict[str, list[float]]]) -> str:
  """The plain-text table of `soft_prompt_stats` (one row per layer, then "out")."""
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
  return "\n".join(lines)


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float):
    return None if math.isnan(x) else round(x, 5)
  return x


def run_with_intermediates(llm, llm_params, embeds: jax.Array, attention_mask: jax.Array
                           ) -> tuple[jax.Array, np.ndarray, np.ndarray]:
  """One forward pass that collects what the decoder sows.

  Args:
    llm, llm_params: the decoder and {"params": ...}.
    embeds: float[B, T, E] input embeddings; attention_mask: int[B, T].

  Returns:
    (float32[B, T, V] logits, float32[B, L + 1, T, E] residual stream at each layer's input
     and after the last layer, float32[B, L, T, T] head-averaged attention probabilities).
  """
  (logits, _), state = llm.apply(llm_params, inputs_embeds=embeds,
                                 attention_mask=attention_mask, mutable=["intermediates"])
  inter = state["intermediates"]
  n_layers = llm.config.num_layers
  residual = jnp.stack([r.astype(jnp.float32) for r in inter["residual"]], axis=1)
  probs = jnp.stack([inter[f"layers_{i}"]["attn"]["attn_probs"][0] for i in range(n_layers)],
                    axis=1)
  return logits, residual, probs


def main(argv):
  del argv
  # Heavy imports here: the test imports this module for `soft_prompt_stats` only.
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
  cfg = config.stage2
  workdir = pathlib.Path(FLAGS.workdir)
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, FLAGS.workdir, ds)
  cf_vars = {"params": cf_params}
  tables = item_tables_lib.item_tables(config, workdir, ds, cf_model, cf_vars)
  table = item_tables_lib.item_table_for(cfg.item_source, tables, config.seed,
                                         standardize=cfg.item_standardize)
  loaded = llm_weights.load_llm(config.llm.path or None, dtype=config.llm.dtype,
                                matmul_dtype=config.llm.matmul_dtype or "")
  llm, llm_params = loaded.module, {"params": loaded.params}
  builder = stage2_run.prompt_builder(ds, loaded.tokenizer, cfg)

  es = eval_lib.make_eval_set(ds, FLAGS.split, maxlen=config.data.maxlen,
                              num_history=config.eval.num_history, max_users=0,
                              seed=config.data.candidate_seed)
  if not 0 <= FLAGS.user_index < len(es.users):
    raise SystemExit(f"--user_index={FLAGS.user_index}: the {FLAGS.split} set has "
                     f"{len(es.users)} users")
  es = es.take(np.asarray([FLAGS.user_index]))
  user_rep = stage2_lib.user_representations(cf_model, cf_vars, es.seq)

  proj = projectors_lib.Stage2Projectors(table.shape[1], user_rep.shape[1],
                                         loaded.config.embed_dim)
  params = stage2_lib.init_projectors(proj, jax.random.PRNGKey(config.seed), table.shape[1],
                                      user_rep.shape[1])
  ckpt = workdir / FLAGS.name / "ckpt"
  source = "random"
  if not FLAGS.random_projectors and ckpt.is_dir():
    manager = checkpointing.make_manager(ckpt, max_to_keep=1, read_only=True)
    abstract = {"params": params,
                "opt_state": stage2_lib.make_optimizer(cfg).init(params)}
    restored = checkpointing.restore(manager, abstract=abstract)
    if restored is not None:
      params = restored["params"]
      source = f"{ckpt} step {restored['step']}"

  pb = builder.build(es.history, es.prompt_candidates, es.targets, padding="right").arrays()
  pb["user_rep"] = user_rep.astype(np.float32)
  batch = {k: jnp.asarray(v) for k, v in pb.items()}

  @jax.jit
  def forward(proj_params, llm_params, item_table, batch):
    embeds = soft_prompt.soft_prompt_embeds(llm, llm_params, proj, proj_params, item_table,
                                            batch, use_user=cfg.use_user,
                                            use_items=cfg.use_items)
    logits, residual, probs = run_with_intermediates(llm, llm_params, embeds,
                                                     batch["attention_mask"])
    logp = jax.nn.log_softmax(logits, -1)
    tok_logp = jnp.take_along_axis(
        jnp.take_along_axis(logp, batch["target_pos"][..., None], 1),
        batch["target_ids"][..., None], -1)[..., 0]
    return residual, probs, tok_logp

  residual, probs, tok_logp = jax.device_get(
      forward(params, llm_params, jnp.asarray(table, jnp.float32), batch))

  n_hist = es.history.shape[1]
  item_pos, item_ids = pb["item_pos"][0], pb["item_ids"][0]
  cand_pos, cand_ids = item_pos[n_hist:], item_ids[n_hist:]
  target = int(es.targets[0])
  hit = np.nonzero(cand_ids == target)[0]
  target_slot = int(cand_pos[hit[0]]) if len(hit) else -1
  stats = soft_prompt_stats(residual[0], probs[0], pb["attention_mask"][0],
                            pb["user_pos"][0], item_pos[:n_hist], cand_pos, target_slot,
                            pb["target_pos"][0], pb["target_mask"][0])
  tmask = pb["target_mask"][0] > 0
  nll = float(-(tok_logp[0] * tmask).sum() / max(tmask.sum(), 1))
  length = int(pb["attention_mask"][0].sum())
  info = {"config": {"bos": cfg.bos, "item_slot": cfg.item_slot,
                     "user_at_answer": bool(cfg.user_at_answer),
                     "item_source": cfg.item_source, "use_user": bool(cfg.use_user),
                     "use_items": bool(cfg.use_items),
                     "matmul_dtype": config.llm.matmul_dtype or ""},
          "projectors": source, "split": FLAGS.split, "user_index": FLAGS.user_index,
          "user": int(es.users[0]), "target": target, "target_title": ds.titles[target],
          "length": length, "pos0_token": loaded.tokenizer.convert_ids_to_tokens(
              int(pb["input_ids"][0, 0])),
          "user_pos": [int(p) for p in pb["user_pos"][0] if p < length],
          "num_history_slots": int((item_pos[:n_hist] < length).sum()),
          "num_candidate_slots": int((cand_pos < length).sum()), "target_slot": target_slot,
          "answer_positions": [int(p) for p in pb["target_pos"][0][tmask]],
          "answer_nll": round(nll, 4)}
  print(", ".join(f"{k}={v}" for k, v in info.items() if k != "config"))
  print("config:", ", ".join(f"{k}={v}" for k, v in info["config"].items()))
  print(format_table(stats), flush=True)
  print(json.dumps(_jsonable({**info, **stats})), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
