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
items are computed once instead.

Outputs under `<workdir>/stage1/`: metrics.jsonl (per step), tb/ (TensorBoard), ckpt/
(orbax: trainable params, optimizer state, step, data-iterator state), metrics.json
(alignment metrics), FINISHED and, with text_standardize, text_stats.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
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
from allmrec_jax import metrics as metrics_lib
from allmrec_jax import sharding
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import pipelines
from allmrec_jax.data import scenarios
from allmrec_jax.models import aligner
from allmrec_jax.models.text import bert
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import steps as steps_lib
from allmrec_jax.weights import sbert as sbert_lib

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


def item_texts(dataset: dataset_lib.RecDataset) -> list[str]:
  """len N+1: "" for the padding item 0, then `dataset.item_text(i)`."""
  return [""] + [dataset.item_text(i) for i in range(1, dataset.num_items + 1)]


def item_text_table(dataset: dataset_lib.RecDataset, tokenizer, max_len: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises every item text once: (ids int32[N+1, T], mask int32[N+1, T]).

  T = min(max_len, the longest item text rounded up to a multiple of 8): trailing columns
  that are padding for every item are dropped (they cannot change an embedding).
  """
  ids, mask = sbert_lib.tokenize_texts(tokenizer, item_texts(dataset), max_len)
  longest = int(mask.sum(axis=1).max()) if mask.size else 1
  t = min(max_len, max(8, -(-longest // 8) * 8))
  return ids[:, :t], mask[:, :t]


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


_WORD = ("sbert", "word", "embedding")


class CompactVocab(NamedTuple):
  """The SBERT vocabulary rows the item texts use (`stage1.compact_vocab`).

  Only these rows of the word-embedding table ever get a gradient, so Adam over them alone
  is Adam over the whole table: the other rows keep m = v = 0 and an update of exactly 0.
  The train step gathers these rows, differentiates and updates them as a [U, t] leaf
  (Adam state [U, t]) and scatters them back, instead of materialising and updating a dense
  [vocab, t] gradient every step (30522 x 384 for MiniLM).
  """
  rows: Array      # int32[U] sorted vocabulary ids
  remap: Array     # int32[vocab]: id -> index in `rows` (0 for ids no item text uses)
  module: bert.BertEncoder   # the SBERT with vocab_size = U


def compact_vocab(text_ids: np.ndarray, module: bert.BertEncoder) -> CompactVocab:
  """CompactVocab of the token table `text_ids` (every id any item text or pad uses)."""
  rows = np.unique(np.concatenate([np.asarray(text_ids).reshape(-1), [0]])).astype(np.int32)
  vocab = module.config.vocab_size
  if rows[-1] >= vocab:
    raise ValueError(f"stage1: token id {int(rows[-1])} >= the SBERT vocab_size {vocab}")
  remap = np.zeros(vocab, np.int32)
  remap[rows] = np.arange(rows.size, dtype=np.int32)
  small = bert.BertEncoder(dataclasses.replace(module.config, vocab_size=int(rows.size)))
  return CompactVocab(jnp.asarray(rows), jnp.asarray(remap), small)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _with(tree, path, value):
  """A copy of nested dict `tree` with tree[path] = value."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _with(tree[path[0]], path[1:], value)
  return out


def to_compact(trainable: PyTree, vocab: CompactVocab | None) -> PyTree:
  """The trainable tree with the word-embedding table cut to `vocab.rows` (unchanged when
  vocab is None or SBERT is frozen)."""
  if vocab is None or "sbert" not in trainable:
    return trainable
  return _with(trainable, _WORD, _get(trainable, _WORD)[vocab.rows])


def init_opt_state(tx: optax.GradientTransformation, trainable: PyTree,
                   vocab: CompactVocab | None = None) -> PyTree:
  """tx.init over the tree the step differentiates (compact word rows with `vocab`)."""
  return tx.init(to_compact(trainable, vocab))


def packing_rows(text_mask: np.ndarray, batch_size: int, slack: float = 1.05
                 ) -> tuple[int, ...]:
  """Static row counts for packing the 2B texts of a batch into rows of T tokens.

  The first bucket holds the average batch with `slack` (rounded up to a multiple of 4),
  the second 25% more, then each doubles up to 2B rows (always enough), so the hot loop
  compiles a handful of shapes at most. On MovieLens-100K at B=60 (T=32, ~695 tokens per
  batch, 21-25 rows needed) the buckets are (24, 32, 64, 120): ~90% of the token slots
  are real tokens.
  """
  t = text_mask.shape[1]
  mean_len = float(text_mask[1:].sum(1).mean()) if text_mask.shape[0] > 1 else float(t)

  def up4(x: float) -> int:
    r = max(1, int(math.ceil(x)))
    return -(-r // 4) * 4 if r > 4 else r
  r = up4(slack * 2 * batch_size * mean_len / t)
  out = []
  nxt = up4(1.25 * r)
  while r < 2 * batch_size:
    out.append(r)
    r, nxt = nxt, 2 * nxt
  out.append(2 * batch_size)
  return tuple(out)


def pack_batch_texts(batch: dict[str, np.ndarray], text_ids: np.ndarray,
                     text_mask: np.ndarray, rows: tuple[int, ...]) -> dict[str, Any]:
  """Adds batch["packed_text"]: the pos then neg item texts packed into the first row
  bucket they fit (host side, numpy; the tokenizer is never called)."""
  items = np.concatenate([batch["pos"], batch["neg"]]).astype(np.int64)
  ids, mask = text_ids[items], text_mask[items]
  for r in rows:
    packed = bert.pack_texts(ids, mask, rows=r)
    if packed is not None:
      return {**batch, "packed_text": packed}
  raise AssertionError("pack_batch_texts: the last bucket (2B rows) always fits")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sbert_forward_packed(module: bert.BertEncoder, params, packed, num_texts: int):
  return module.apply({"params": params}, packed["input_ids"], packed["attention_mask"],
                      positions=packed["positions"], segment_ids=packed["segment_ids"],
                      text_index=packed["text_index"], num_texts=num_texts)[0]


def sbert_embed_all(module: bert.BertEncoder, params: PyTree, ids: np.ndarray,
                    mask: np.ndarray, batch_size: int = 256) -> Array:
  """float[N+1, t] SBERT embeddings of the whole token table (deterministic).

  Chunks of `batch_size` texts, each packed several texts per row (`bert.pack_texts`;
  same embeddings as one row per text).
  """
  n = ids.shape[0]
  batch_size = max(1, min(batch_size, n))
  pad = (-n) % batch_size
  ids_p = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
  mask_p = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
  buckets = packing_rows(mask, -(-batch_size // 2))
  outs = []
  for i in range(0, n + pad, batch_size):
    b = {"pos": np.zeros(0, np.int64), "neg": np.arange(i, i + batch_size)}
    packed = pack_batch_texts(b, ids_p, mask_p, buckets)["packed_text"]
    outs.append(_sbert_forward_packed(module, params, packed, batch_size))
  return jnp.concatenate(outs)[:n]


def cf_variables(cf_params: PyTree) -> PyTree:
  """Flax variables {"params": ...} from either the variables or the bare params tree
  (`load_trained_cf` returns the bare "params" collection)."""
  if isinstance(cf_params, dict) and set(cf_params) == {"params"}:
    return cf_params
  return {"params": cf_params}


def cf_item_table(cf_model, cf_params) -> Array:
  """float[N+1, d] the frozen CF item table E (cf_params: variables or bare params)."""
  return cf_model.apply(cf_variables(cf_params), method=cf_model.item_embeddings)


def text_stats(text_table: Array, eps: float = 1e-6) -> dict[str, Array]:
  """{"mean", "scale": float[t]} per-dimension mean and standard deviation of the SBERT
  embeddings of items 1..N (row 0, the padding item, excluded); used by
  `stage1.text_standardize` to feed (Q - mean) / scale to the text auto-encoder."""
  q = jnp.asarray(text_table, jnp.float32)[1:]
  return {"mean": jnp.mean(q, axis=0), "scale": jnp.maximum(jnp.std(q, axis=0), eps)}


def standardize_text(q: Array, stats: dict[str, Array] | None) -> Array:
  """(q - mean) / scale with `text_stats`, or q unchanged when stats is None."""
  if stats is None:
    return q
  return ((q.astype(jnp.float32) - stats["mean"]) / stats["scale"]).astype(q.dtype)


# ----------------------------------------------------------------------------- step
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
      rows = _get(trainable, _WORD)
      trainable = _with(trainable, _WORD, _get(full, _WORD).at[vocab.rows].set(rows))
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
def cold_items(dataset: dataset_lib.RecDataset, fraction: float = 0.35) -> np.ndarray:
  """bool[N+1]: the cold items of `scenarios.cold_warm_items` (bottom `fraction` by count)."""
  cold, _ = scenarios.cold_warm_items(dataset, fraction)
  out = np.zeros(dataset.num_items + 1, bool)
  out[cold] = True
  return out


def text_to_item_recall(q: Array, e: Array, ks=(1, 10), batch_size: int = 512
                        ) -> dict[str, float]:
  """For every item i >= 1, ranks all joint embeddings e_j (j >= 1) by squared distance to
  q_i; recall@k = share of items whose own e_i is among the k nearest (ties pessimistic).

  q, e: float[N+1, latent] (row 0 = padding, ignored).
  """
  q = jnp.asarray(q)[1:]
  e = jnp.asarray(e)[1:]
  n = q.shape[0]

  @jax.jit
  def ranks_of(qb, idx):
    d = (jnp.sum(qb * qb, -1)[:, None] - 2 * qb @ e.T + jnp.sum(e * e, -1)[None, :])
    return metrics_lib.rank_of_item(-d, idx)

  ranks = []
  for s in range(0, n, batch_size):
    idx = jnp.arange(s, min(s + batch_size, n), dtype=jnp.int32)
    ranks.append(np.asarray(ranks_of(q[s:s + batch_size], idx)))
  r = np.concatenate(ranks)
  out = {f"align/text2item_recall@{k}": float(np.mean(r < k)) for k in ks}
  out["align/text2item_mean_rank"] = float(np.mean(r))
  out["align/random_recall@10"] = float(min(1.0, 10 / max(n, 1)))
  return out


def evaluate_alignment(models: Stage1Models, params: PyTree, *, dataset, cf_model,
                       cf_params, item_table: Array, text_ids: np.ndarray,
                       text_mask: np.ndarray, cfg: Stage1Config) -> dict[str, float]:
  """Alignment metrics: text->item retrieval and the cold-item scoring path.

  cold/hit@1_text: test users whose target is a cold item; their 20 stored candidates
  scored with s(x_u, f_I^dec(e_i)), e_i = f_T^enc(SBERT(text_i)); cold/hit@1_cf: the same
  with e_i = f_I^enc(E_i); cold/hit@1_cf_model: the CF model's own scores. Same for warm
  users (target in the top fraction, `scenarios.cold_warm_users`) under warm/, and all/.
  """
  cf_params = cf_variables(cf_params)
  e = joint_item_embeddings(models, params, source="cf", item_table=item_table)
  q = joint_item_embeddings(models, params, source="text", text_ids=text_ids,
                            text_mask=text_mask, batch_size=cfg.eval_batch_size)
  out = text_to_item_recall(q, e)

  users = dataset.eval_users("test")
  if users.size:
    hist = dataset.history_matrix("test", cfg.maxlen)[users]
    cands = dataset.candidates("test")[users]
    groups = scenarios.cold_warm_users(dataset, "test", cfg.cold_fraction)
    cold = np.isin(users, groups["cold"])
    warm = np.isin(users, groups["warm"])
    dec = {
        "text": models.item_ae.apply({"params": params["item_ae"]}, q,
                                     method=models.item_ae.decode),
        "cf": models.item_ae.apply({"params": params["item_ae"]}, e,
                                   method=models.item_ae.decode),
    }

    @jax.jit
    def scores(h, c):
      x = cf_model.apply(cf_params, h, method=cf_model.user_representation)
      res = {k: jnp.mean(x[:, None, :] * v[c], axis=-1) for k, v in dec.items()}
      res["cf_model"] = cf_model.apply(cf_params, h, c, method=cf_model.score)
      return {k: metrics_lib.rank_of_target(v) for k, v in res.items()}

    bs = cfg.eval_batch_size
    ranks: dict[str, list[np.ndarray]] = {}
    for s in range(0, users.size, bs):
      h, c = hist[s:s + bs], cands[s:s + bs]
      m = h.shape[0]
      if m < bs:  # one compiled shape
        h = np.concatenate([h, np.repeat(h[-1:], bs - m, 0)])
        c = np.concatenate([c, np.repeat(c[-1:], bs - m, 0)])
      for k, v in scores(h, c).items():
        ranks.setdefault(k, []).append(np.asarray(v)[:m])
    for k, v in ranks.items():
      r = np.concatenate(v)
      for group, sel in (("cold", cold), ("warm", warm), ("all", np.ones_like(cold))):
        key = f"{group}/hit@1_{k}"
        out[key] = float(np.mean(r[sel] == 0)) if sel.any() else float("nan")
    out["cold/num_users"] = int(cold.sum())
    out["warm/num_users"] = int(warm.sum())
  return out


# ----------------------------------------------------------------------------- training
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


TEXT_STATS_FILE = "text_stats.json"


def _text_stats_for(cfg: Stage1Config, sdir: pathlib.Path, sb, text_ids, text_mask,
                    text_table=None) -> dict[str, Array] | None:
  """The `text_stats` of the pretrained SBERT (None unless cfg.text_standardize), written to
  `<stage1>/text_stats.json` for `load_trained_stage1`."""
  if not cfg.text_standardize:
    return None
  if text_table is None:
    text_table = sbert_embed_all(sb.module, sb.params, text_ids, text_mask,
                                 cfg.eval_batch_size)
  stats = text_stats(text_table)
  (sdir / TEXT_STATS_FILE).write_text(json.dumps(
      {k: np.asarray(v, np.float64).tolist() for k, v in stats.items()}))
  return stats


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

  data = pipelines.stage1_dataset(dataset, batch_size=cfg.batch_size, maxlen=cfg.maxlen,
                                  seed=cfg.seed, num_epochs=cfg.num_epochs,
                                  drop_remainder=False)
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
  stats = _text_stats_for(cfg, sdir, sb, text_ids, text_mask, pretrained_table)
  if stats is not None:
    frozen["text_stats"] = stats

  manager = checkpointing.make_manager(sdir / "ckpt", max_to_keep=2)
  iterator = pipelines.make_iterator(data)
  step = 0
  restored = checkpointing.restore(manager, abstract={"params": trainable,
                                                      "opt_state": opt_state},
                                   quarantine=True)
  if restored is not None:
    trainable, opt_state = restored["params"], restored["opt_state"]
    step = int(restored["extra"]["step"])
    iterator.set_state(restored["extra"]["iterator"])
    logging.info("stage1: resumed at step %d", step)

  # Data parallel over the mesh: the trainable tree, its optimizer state and the frozen
  # inputs replicated, every batch split over the data axes (gradients all-reduced by XLA).
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rep = sharding.replicated(mesh)
  state = jax.device_put(steps_lib.new_state(trainable, opt_state, step), rep)
  frozen = jax.device_put(frozen, rep)
  train_step = steps_lib.compile_step(
      make_train_step(models, cf_model, cfg, tx, vocab=vocab, jit=False), state, frozen)
  loop = loop_lib.TrainLoop(sdir, name="stage1", total=total_steps, initial=step,
                            ckpt_every=cfg.checkpoint_every if cfg.checkpoint_every > 0
                            else spe, manager=manager, log_every=cfg.log_every)
  jsonl = loop.path
  t0, seen, first_step = time.perf_counter(), 0, step
  try:
    while step < total_steps:
      batch = next(iterator)
      batch = sharding.put_batch(mesh, {k: batch[k] for k in ("seq", "pos", "neg", "mask",
                                                              "packed_text") if k in batch},
                                 process_local=False)
      state, m = train_step(state, frozen, batch, dropout_rng)
      step += 1
      if step == first_step + 1:  # exclude the compiling step from the rate
        jax.block_until_ready(state)
        t0 = time.perf_counter()
      else:
        seen += int(batch["mask"].sum())
      if loop.log_due(step):
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        m["train/epoch"] = (step - 1) // spe
        m["train/users_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
        loop.log(step, {"step": step, **m}, postfix={"loss": f"{m['train/loss']:.4f}"})
      loop.advance()
      if loop.ckpt_due(step):
        loop.save(step, params=state["params"], opt_state=state["opt_state"],
                  extra={"step": step, "iterator": iterator.get_state()})
  finally:
    loop.close()

  params = dict(state["params"])
  params.setdefault("sbert", sb.params)
  if stats is not None:
    params["text_stats"] = stats
  results = evaluate_alignment(models, params, dataset=dataset, cf_model=cf_model,
                               cf_params=cf_params, item_table=item_table,
                               text_ids=text_ids, text_mask=text_mask, cfg=cfg)
  results["train/steps"] = step
  if jsonl.exists():
    lines = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
    if lines:
      for k in ("train/loss",) + tuple(f"train/{t}" for t in LOSS_TERMS):
        if k in lines[-1]:
          results[f"final/{k}"] = lines[-1][k]
          results[f"first/{k}"] = lines[0][k]
  metrics_file.write_text(json.dumps(results, indent=2, default=_json_default))
  loop_lib.mark_finished(sdir, {"steps": step})
  logging.info("stage1: %s", results)
  return results


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
