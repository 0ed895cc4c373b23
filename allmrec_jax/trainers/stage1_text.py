"""Stage 1's item texts: the tokenised item-text table, packing several short texts per
SBERT row, SBERT over every item, the statistics that standardise its outputs, and Adam
over the word-embedding rows the texts use."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from allmrec_jax import common_types as ct
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.models.text import bert
from allmrec_jax.weights import sbert as sbert_lib

Array = ct.Array
PyTree = ct.PyTree

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


WORD_PATH = ("sbert", "word", "embedding")


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


def get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def with_path(tree, path, value):
  """A copy of nested dict `tree` with tree[path] = value."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else with_path(tree[path[0]], path[1:], value)
  return out


def to_compact(trainable: PyTree, vocab: CompactVocab | None) -> PyTree:
  """The trainable tree with the word-embedding table cut to `vocab.rows` (unchanged when
  vocab is None or SBERT is frozen)."""
  if vocab is None or "sbert" not in trainable:
    return trainable
  return with_path(trainable, WORD_PATH, get_path(trainable, WORD_PATH)[vocab.rows])


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


TEXT_STATS_FILE = "text_stats.json"


def text_stats_for(cfg, sdir: pathlib.Path, sb, text_ids: np.ndarray, text_mask: np.ndarray,
                   text_table: Array | None = None) -> dict[str, Array] | None:
  """The `text_stats` of the pretrained SBERT `sb` (None unless cfg.text_standardize),
  written to `<stage1>/text_stats.json` (by process 0) for `load_trained_stage1`.

  cfg: the stage's Stage1Config; text_table: SBERT of every item when already computed.
  """
  if not cfg.text_standardize:
    return None
  if text_table is None:
    text_table = sbert_embed_all(sb.module, sb.params, text_ids, text_mask,
                                 cfg.eval_batch_size)
  stats = text_stats(text_table)
  if jax.process_index() == 0:
    (sdir / TEXT_STATS_FILE).write_text(json.dumps(
        {k: np.asarray(v, np.float64).tolist() for k, v in stats.items()}))
  return stats


# ----------------------------------------------------------------------------- step
