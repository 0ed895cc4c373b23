"""Stage 1 of A-LLMRec: align collaborative and text knowledge (SPEC section 1).

For each user the last training position gives x_u (the frozen CF model's state after
train[:-1]), the positive item p (the last training item) and a sampled negative n. With
E the frozen CF item table and Q = SBERT(item text):
  e = f_I^enc(E_i), q = f_T^enc(Q_i)                                  (i in {p, n})
  match      = MSE(e_p, q_p) + MSE(e_n, q_n)
  item_recon = MSE(f_I^dec(e_p), E_p) + MSE(f_I^dec(e_n), E_n)
  text_recon = MSE(f_T^dec(q_p), sg(Q_p)) + MSE(f_T^dec(q_n), sg(Q_n))
  rec        = BCE(s(x_u, f_I^dec(e_p)), 1) + BCE(s(x_u, f_I^dec(e_n)), 0),  s = mean(a * b)
  loss = w_rec rec + w_match match + w_item_recon item_recon + w_text_recon text_recon
Options beyond the paper (default off): `config.sbert.normalize` ("auto" | "false" | "true")
drops or forces SBERT's final L2 normalisation (all-MiniLM-L6-v2 has one, the paper's
nq-distilbert-base-v1 has none); `stage1.text_standardize` feeds f_T (Q - mean) / std per
dimension, the statistics of the pretrained SBERT over all items computed once (fixed while
SBERT is fine-tuned, stored in text_stats.json for stage 2).
Only the trainable tree {item_ae, text_ae, sbert (unless freeze_sbert)} has gradients and
optimizer state; the CF parameters are a separate frozen argument. Item texts are
tokenised once into a padded id table; with `freeze_sbert` the SBERT embeddings of all
items are computed once instead. Data parallel: every process builds the whole global batch
and places its rows of it on its devices; process 0 writes the metrics and stats files.

Outputs under `<workdir>/stage1/`: metrics.jsonl (per step), tb/ (TensorBoard), ckpt/
(orbax: trainable params, optimizer state, step, data-iterator state), metrics.json
(alignment metrics), FINISHED and, with text_standardize, text_stats.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from allmrec_jax import checkpointing
from allmrec_jax import config_lib
from allmrec_jax import common_types as ct
from allmrec_jax import losses
from allmrec_jax import sharding
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import pipelines
from allmrec_jax.models import aligner
from allmrec_jax.models.text import bert
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import steps as steps_lib
from allmrec_jax.weights import sbert as sbert_lib

# Re-exported: stage 1's item-text and alignment-metric parts live in their own modules.
from allmrec_jax.trainers.stage1_text import (  # noqa: F401
    TEXT_STATS_FILE,
    WORD_PATH,
    CompactVocab,
    compact_vocab,
    get_path,
    init_opt_state,
    item_text_table,
    item_texts,
    pack_batch_texts,
    packing_rows,
    standardize_text,
    text_stats,
    text_stats_for,
    sbert_embed_all,
    to_compact,
    with_path,
)
from allmrec_jax.trainers.stage1_eval import (  # noqa: F401
    cold_items,
    evaluate_alignment,
    text_to_item_recall,
)

Array = ct.Array
PyTree = ct.PyTree
STAGE = "stage1"
LOSS_TERMS = ("rec", "match", "item_recon", "text_recon")


@dataclasses.dataclass(frozen=True)
class Stage1Config:
  """The `config.stage1` section (+ the few outside fields stage 1 reads), frozen; built by
  `from_config` (every field present, none unknown; defaults live in configs/base.py)."""
  latent_dim: int
  lr: float
  b1: float
  b2: float
  batch_size: int
  num_epochs: int
  freeze_sbert: bool
  w_rec: float
  w_match: float
  w_item_recon: float
  w_text_recon: float
  sbert_dropout: bool
  max_steps: int
  checkpoint_every: int
  log_every: int
  eval_batch_size: int
  pack_texts: bool
  compact_vocab: bool
  text_standardize: bool
  cold_fraction: float      # config.data.cold_fraction
  maxlen: int               # config.data.maxlen (CF input length)
  text_max_len: int         # config.sbert.max_len
  seed: int                 # config.seed

  @classmethod
  def from_config(cls, config) -> Stage1Config:
    cfg = config_lib.section(cls, config, "stage1", maxlen=int(config.data.maxlen),
                             text_max_len=int(config.sbert.max_len), seed=int(config.seed),
                             cold_fraction=float(config.data.cold_fraction))
    for n in ("latent_dim", "batch_size", "num_epochs", "text_max_len", "maxlen"):
      if getattr(cfg, n) <= 0:
        raise ValueError(f"config.stage1.{n} must be > 0, got {getattr(cfg, n)}")
    for n in ("w_rec", "w_match", "w_item_recon", "w_text_recon"):
      if getattr(cfg, n) < 0:
        raise ValueError(f"config.stage1.{n} must be >= 0, got {getattr(cfg, n)}")
    return cfg


class Stage1Models(NamedTuple):
  """The stage-1 modules (all flax.linen)."""
  item_ae: aligner.ItemAutoEncoder
  text_ae: aligner.TextAutoEncoder
  sbert: bert.BertEncoder


# ----------------------------------------------------------------------------- setup
def make_models(cf_dim: int, sbert_module: bert.BertEncoder, latent_dim: int = 128
                ) -> Stage1Models:
  return Stage1Models(aligner.ItemAutoEncoder(cf_dim, latent_dim),
                      aligner.TextAutoEncoder(sbert_module.config.hidden_size, latent_dim),
                      sbert_module)


def init_trainable(models: Stage1Models, rng: Array, sbert_params: PyTree,
                   freeze_sbert: bool) -> PyTree:
  """{"item_ae", "text_ae"} (fresh, torch-Linear init) + {"sbert"} unless frozen."""
  k1, k2 = jax.random.split(rng)
  d = models.item_ae.dim
  t = models.text_ae.dim
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  out = {
      "item_ae": nn.unbox(models.item_ae.init(k1, jnp.zeros((1, d)))["params"]),
      "text_ae": nn.unbox(models.text_ae.init(k2, jnp.zeros((1, t)))["params"]),
  }
  if not freeze_sbert:
    out["sbert"] = sbert_params
  return out


def make_optimizer(cfg: Stage1Config) -> optax.GradientTransformation:
  """Adam(lr, (b1, b2), eps=1e-8) as torch.optim.Adam."""
  return optax.adam(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=1e-8)


def cf_variables(cf_params: PyTree) -> PyTree:
  """Flax variables {"params": ...} from either the variables or the bare params tree
  (`load_trained_cf` returns the bare "params" collection)."""
  if isinstance(cf_params, dict) and set(cf_params) == {"params"}:
    return cf_params
  return {"params": cf_params}


def cf_item_table(cf_model, cf_params) -> Array:
  """float[N+1, d] the frozen CF item table E (cf_params: variables or bare params)."""
  return cf_model.apply(cf_variables(cf_params), method=cf_model.item_embeddings)


def stage1_loss(trainable: PyTree, frozen: dict[str, Any], batch: dict[str, Array],
                rng: Array, *, models: Stage1Models, cf_model, cfg: Stage1Config
                ) -> tuple[Array, dict[str, Array]]:
  """Total loss and its terms for one batch.

  Args:
    trainable: {"item_ae", "text_ae", "sbert"?} parameter trees.
    frozen: {"cf": CF variables, "item_table": float[N+1, d]} and either
      {"text_ids", "text_mask": int32[N+1, T]} (SBERT fine-tuned) or
      {"text_table": float[N+1, t]} (SBERT frozen); optionally "text_stats"
      (`text_stats`: SBERT outputs are standardised before f_T and as its recon target)
      and "loss_weights" (`loss_weights`; default: cfg's).
    batch: seq int32[B, L], pos int32[B], neg int32[B], mask float32[B] (0 = padding row),
      optionally packed_text (the 2B texts of pos then neg packed by `pack_batch_texts`;
      used instead of the token table when SBERT is fine-tuned: same embeddings, ~4x
      fewer token slots on short titles).
    rng: dropout key (SBERT in train mode).
  """
  w = batch["mask"].astype(jnp.float32)
  pos, neg = batch["pos"], batch["neg"]
  user = cf_model.apply(frozen["cf"], batch["seq"], method=cf_model.user_representation)
  user = jax.lax.stop_gradient(user)
  table = frozen["item_table"]
  e_in_p, e_in_n = table[pos], table[neg]
  if "text_table" in frozen:
    q_in_p, q_in_n = frozen["text_table"][pos], frozen["text_table"][neg]
  elif "packed_text" in batch:   # pos then neg texts, several per row (see pack_batch_texts)
    pk = batch["packed_text"]
    q_in, _ = models.sbert.apply(
        {"params": trainable["sbert"]}, _ids(frozen, pk["input_ids"]), pk["attention_mask"],
        deterministic=not cfg.sbert_dropout, rngs={"dropout": rng},
        positions=pk["positions"], segment_ids=pk["segment_ids"],
        text_index=pk["text_index"], num_texts=2 * pos.shape[0])
    q_in_p, q_in_n = jnp.split(q_in, 2)
  else:
    items = jnp.concatenate([pos, neg])
    q_in, _ = models.sbert.apply(
        {"params": trainable["sbert"]}, _ids(frozen, frozen["text_ids"][items]),
        frozen["text_mask"][items],
        deterministic=not cfg.sbert_dropout, rngs={"dropout": rng})
    q_in_p, q_in_n = jnp.split(q_in, 2)
  q_in_p = standardize_text(q_in_p, frozen.get("text_stats"))
  q_in_n = standardize_text(q_in_n, frozen.get("text_stats"))
  item_ae = functools.partial(models.item_ae.apply, {"params": trainable["item_ae"]})
  text_ae = functools.partial(models.text_ae.apply, {"params": trainable["text_ae"]})
  e_p, dec_p = item_ae(e_in_p)
  e_n, dec_n = item_ae(e_in_n)
  q_p, tdec_p = text_ae(q_in_p)
  q_n, tdec_n = text_ae(q_in_n)
  terms = {
      "rec": losses.stage1_rec_loss(user, dec_p, dec_n, w),
      "match": losses.stage1_matching_loss(e_p, q_p, e_n, q_n, w),
      "item_recon": losses.stage1_item_recon_loss(dec_p, e_in_p, dec_n, e_in_n, w),
      "text_recon": losses.stage1_text_recon_loss(tdec_p, q_in_p, tdec_n, q_in_n, w),
  }
  weights = frozen["loss_weights"] if "loss_weights" in frozen else loss_weights(cfg)
  total = losses.stage1_total_loss(terms, *weights)
  return total, terms


def loss_weights(cfg: Stage1Config) -> Array:
  """float32[4] (w_rec, w_match, w_item_recon, w_text_recon), the order of LOSS_TERMS.
  The trainer passes them in `frozen` (an argument of the step, not constants of its
  program), so runs that differ only in the weights, such as the loss ablations, share one
  compiled step."""
  return jnp.asarray([cfg.w_rec, cfg.w_match, cfg.w_item_recon, cfg.w_text_recon],
                     jnp.float32)


def _ids(frozen: dict[str, Any], ids: Array) -> Array:
  """Token ids in the vocabulary the SBERT parameters have (compact rows under
  `stage1.compact_vocab`, see CompactVocab)."""
  return frozen["vocab_remap"][ids] if "vocab_remap" in frozen else ids


def make_train_step(models: Stage1Models, cf_model, cfg: Stage1Config,
                    tx: optax.GradientTransformation, donate: bool = True,
                    vocab: CompactVocab | None = None, jit: bool = True):
  """Jitted `train_step(state, frozen, batch, rng) -> (state, metrics)` (trainers/steps.py;
  state = {"params": trainable, "opt_state", "step"}); gradients and updates exist for the
  trainable tree only; the dropout key is fold_in(rng, state["step"]).

  With `vocab` (SBERT fine-tuned), opt_state comes from `init_opt_state(tx, trainable,
  vocab)`: the step differentiates and updates only the word-embedding rows the item texts
  use (same result as dense Adam over the whole table, see CompactVocab).
  """
  if vocab is not None:
    models = models._replace(sbert=vocab.module)
  loss_fn = functools.partial(stage1_loss, models=models, cf_model=cf_model, cfg=cfg)

  def train_step(state, frozen, batch, rng):
    trainable, opt_state = state["params"], state["opt_state"]
    rng = jax.random.fold_in(rng, state["step"])
    full = trainable
    if vocab is not None and "sbert" in trainable:
      trainable = to_compact(full, vocab)
      frozen = {**frozen, "vocab_remap": vocab.remap}
    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if vocab is not None and "sbert" in trainable:   # scatter the rows back
      rows = get_path(trainable, WORD_PATH)
      trainable = with_path(trainable, WORD_PATH, get_path(full, WORD_PATH).at[vocab.rows].set(rows))
    out = {"train/loss": total, "train/grad_norm": optax.global_norm(grads)}
    out.update({f"train/{k}": v for k, v in terms.items()})
    return steps_lib.new_state(trainable, opt_state, state["step"] + 1), out

  if not jit:     # the trainer compiles it with declared shardings (steps.compile_step)
    return train_step
  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------- embeddings
def joint_item_embeddings(models: Stage1Models, params: PyTree, *, source: str = "cf",
                          item_table: Array | None = None, text_ids: np.ndarray | None = None,
                          text_mask: np.ndarray | None = None, text_table: Array | None = None,
                          batch_size: int = 256) -> Array:
  """float[N+1, latent] joint embeddings of all items (row 0 = the padding item).

  source="cf":   e_i = f_I^enc(E_i) from the CF item table float[N+1, d] (warm items).
  source="text": e_i = f_T^enc(SBERT(text_i)) ("A-LLMRec (SBERT)", cold items) from the
    token table (text_ids/text_mask int32[N+1, T], run through params["sbert"]) or from
    precomputed SBERT embeddings `text_table` float[N+1, t].
  params: {"item_ae", "text_ae", "sbert"} and optionally "text_stats" (`text_stats`, with
    `stage1.text_standardize`: SBERT outputs are standardised before f_T^enc).
  """
  if source == "cf":
    if item_table is None:
      raise ValueError("joint_item_embeddings(source='cf') needs item_table")
    return models.item_ae.apply({"params": params["item_ae"]}, item_table,
                                method=models.item_ae.encode)
  if source == "text":
    if text_table is None:
      if text_ids is None or text_mask is None:
        raise ValueError("joint_item_embeddings(source='text') needs text_ids/text_mask "
                         "or text_table")
      text_table = sbert_embed_all(models.sbert, params["sbert"], text_ids, text_mask,
                                   batch_size)
    text_table = standardize_text(jnp.asarray(text_table), params.get("text_stats"))
    return models.text_ae.apply({"params": params["text_ae"]}, text_table,
                                method=models.text_ae.encode)
  raise ValueError(f"joint_item_embeddings: source must be 'cf' or 'text', got {source!r}")


# ----------------------------------------------------------------------------- evaluation
def _stage_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).expanduser() / STAGE


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)


def _load_sbert(config):
  return sbert_lib.load_sbert(config.sbert.path or None,
                              dtype=config.sbert.dtype, normalize=config.sbert.normalize,
                              matmul_dtype=config.sbert.matmul_dtype or "")


def train_and_evaluate(config, workdir, dataset: dataset_lib.RecDataset, cf_model,
                       cf_params) -> dict[str, float]:
  """Trains stage 1 (resuming from `<workdir>/stage1/ckpt`), writes and returns metrics.

  A finished run (FINISHED with at least the requested number of steps) is not
  retrained: its metrics.json is returned.
  """
  cfg = Stage1Config.from_config(config)
  sdir = _stage_dir(workdir)
  sdir.mkdir(parents=True, exist_ok=True)
  cf_params = cf_variables(cf_params)

  sb = _load_sbert(config)
  item_table = cf_item_table(cf_model, cf_params)
  models = make_models(int(item_table.shape[-1]), sb.module, cfg.latent_dim)
  text_ids, text_mask = item_text_table(dataset, sb.tokenizer, cfg.text_max_len)

  # Every process builds the whole global batch (packed texts index all its 2B texts) and
  # `put_batch(process_local=False)` below keeps this process's rows of it.
  data = pipelines.stage1_dataset(dataset, batch_size=cfg.batch_size, maxlen=cfg.maxlen,
                                  seed=cfg.seed, num_epochs=cfg.num_epochs,
                                  drop_remainder=False, process_index=0, process_count=1)
  if cfg.pack_texts and not cfg.freeze_sbert:
    rows = packing_rows(text_mask, cfg.batch_size)
    data = data.map(functools.partial(pack_batch_texts, text_ids=text_ids,
                                      text_mask=text_mask, rows=rows))
  spe = pipelines.steps_per_epoch(dataset, cfg.batch_size, drop_remainder=False)
  total_steps = len(data)
  if cfg.max_steps > 0:
    total_steps = min(total_steps, cfg.max_steps)

  metrics_file = sdir / "metrics.json"
  done = loop_lib.finished(sdir)
  if (done is not None and metrics_file.exists()
      and int(done.get("steps", -1)) >= total_steps):
    logging.info("stage1: finished run found in %s, skipping training", sdir)
    return json.loads(metrics_file.read_text())

  rng = jax.random.key(cfg.seed)
  init_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, 1))
  trainable = init_trainable(models, init_rng, sb.params, cfg.freeze_sbert)
  tx = make_optimizer(cfg)
  vocab = (compact_vocab(text_ids, sb.module)
           if cfg.compact_vocab and not cfg.freeze_sbert else None)
  opt_state = init_opt_state(tx, trainable, vocab)
  frozen: dict[str, Any] = {"cf": cf_params, "item_table": item_table,  # no grads, no opt
                            "loss_weights": loss_weights(cfg)}
  pretrained_table = None
  if cfg.freeze_sbert:
    pretrained_table = sbert_embed_all(sb.module, sb.params, text_ids, text_mask,
                                       cfg.eval_batch_size)
    frozen["text_table"] = pretrained_table
  else:
    frozen["text_ids"] = jnp.asarray(text_ids)
    frozen["text_mask"] = jnp.asarray(text_mask)
  stats = text_stats_for(cfg, sdir, sb, text_ids, text_mask, pretrained_table)
  if stats is not None:
    frozen["text_stats"] = stats

  manager = checkpointing.make_manager(sdir / "ckpt", max_to_keep=2)
  # Data parallel over the mesh: the trainable tree, its optimizer state and the frozen
  # inputs replicated, every batch split over the data axes (gradients all-reduced by XLA).
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rep = sharding.replicated(mesh)
  state = jax.device_put(steps_lib.new_state(trainable, opt_state, 0), rep)
  frozen = jax.device_put(frozen, rep)
  train_step = steps_lib.compile_step(
      make_train_step(models, cf_model, cfg, tx, vocab=vocab, jit=False), state, frozen)
  batch_keys = ("seq", "pos", "neg", "mask", "packed_text")

  def step_fn(st, batch):
    batch = sharding.put_batch(mesh, {k: batch[k] for k in batch_keys if k in batch},
                               process_local=False)
    st, m = train_step(st, frozen, batch, dropout_rng)
    return st, {**m, "train/epoch": (st["step"] - 1) // spe}

  def finalize(state) -> dict:
    params = dict(state["params"])
    params.setdefault("sbert", sb.params)
    if stats is not None:
      params["text_stats"] = stats
    e = joint_item_embeddings(models, params, source="cf", item_table=item_table)
    q = joint_item_embeddings(models, params, source="text", text_ids=text_ids,
                              text_mask=text_mask, batch_size=cfg.eval_batch_size)
    results = evaluate_alignment(models.item_ae, params, dataset=dataset, cf_model=cf_model,
                                 cf_variables=cf_params, e=e, q=q, maxlen=cfg.maxlen,
                                 cold_fraction=cfg.cold_fraction,
                                 batch_size=cfg.eval_batch_size)
    results["train/steps"] = total_steps
    jsonl = sdir / "metrics.jsonl"
    if jsonl.exists():
      lines = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
      if lines:
        for k in ("train/loss",) + tuple(f"train/{t}" for t in LOSS_TERMS):
          if k in lines[-1]:
            results[f"final/{k}"] = lines[-1][k]
            results[f"first/{k}"] = lines[0][k]
    text = json.dumps(results, indent=2, default=_json_default)
    if jax.process_index() == 0:     # one writer; every process returns what it computed
      metrics_file.write_text(text)
    logging.info("stage1: %s", results)
    final.update(json.loads(text))
    return {"steps": total_steps}

  final: dict[str, Any] = {}          # the metrics, as metrics.json holds them
  loop_lib.run(sdir, name="stage1", state=state, step_fn=step_fn,
               data=pipelines.make_iterator(data), total=total_steps,
               ckpt_every=cfg.checkpoint_every if cfg.checkpoint_every > 0 else spe,
               manager=manager, log_every=cfg.log_every, rate_name="train/users_per_s",
               count_fn=lambda batch: batch["mask"].sum(), finalize=finalize)
  return final


class Stage1Result(NamedTuple):
  models: Stage1Models
  params: PyTree          # {"item_ae", "text_ae", "sbert"}
  tokenizer: Any          # the SBERT tokenizer (for item-text tables)


def load_trained_stage1(config, workdir, cf_dim: int | None = None) -> Stage1Result:
  """Restores the trained stage-1 parameters (latest checkpoint) for stage 2.

  Returns Stage1Result(models, params={"item_ae", "text_ae", "sbert"}, tokenizer); with
  freeze_sbert the SBERT parameters are the loaded pretrained ones; with
  stage1.text_standardize params also holds "text_stats" (used by `joint_item_embeddings`). `cf_dim` (d) defaults
  to the width stored in the checkpoint.
  """
  cfg = Stage1Config.from_config(config)
  sdir = _stage_dir(workdir)
  manager = checkpointing.make_manager(sdir / "ckpt", max_to_keep=1, read_only=True)
  step = checkpointing.latest_step(manager)
  if step is None:
    raise FileNotFoundError(f"load_trained_stage1: no stage-1 checkpoint in {sdir / 'ckpt'} "
                            "(run the stage1 stage first)")
  sb = _load_sbert(config)
  restored = checkpointing.restore(manager, step=step)
  params = jax.tree.map(jnp.asarray, dict(restored["params"]))
  if "sbert" not in params:
    params["sbert"] = sb.params
  if cfg.text_standardize:
    stats_file = sdir / TEXT_STATS_FILE
    if not stats_file.exists():
      raise FileNotFoundError(f"load_trained_stage1: {stats_file} missing (stage1."
                              "text_standardize=True needs the stats of the stage-1 run)")
    params["text_stats"] = {k: jnp.asarray(v, jnp.float32)
                            for k, v in json.loads(stats_file.read_text()).items()}
  stored_dim = int(np.shape(params["item_ae"]["decoder"]["kernel"])[1])
  if cf_dim is not None and cf_dim != stored_dim:
    raise ValueError(f"load_trained_stage1: checkpoint item auto-encoder width {stored_dim} "
                     f"!= CF width {cf_dim} (config.cf.hidden_dim)")
  models = make_models(stored_dim, sb.module, cfg.latent_dim)
  return Stage1Result(models, params, sb.tokenizer)
