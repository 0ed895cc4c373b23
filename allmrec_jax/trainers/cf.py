"""Stage 0: train a CF backbone (SASRec, NCF, GRU4Rec, NextItNet) and evaluate it.

  model, params, metrics = train_and_evaluate(config, workdir, dataset)
  model, params = load_trained_cf(config, workdir, dataset)     # the best checkpoint

Training: optax Adam, BCE with one sampled negative per position (`config.cf.loss`), one
jitted step per batch (`train_step`, state donated); an epoch's batches run in one jitted
`lax.scan` over `train_step` (`train_epoch`) so the CPU pays one dispatch per epoch.
Batches come from `allmrec_jax.data.pipelines.cf_train_dataset` (grain MapDataset; batch
g depends only on (seed, epoch, step-in-epoch)), dropout keys from fold_in(seed, step):
a run resumed from a checkpoint repeats exactly what the uninterrupted run did.
Across processes every process builds the whole global batches and runs the epoch (and the
evaluation, over every user) replicated, so the processes train as one process does.
Every `eval_every` epochs: validation under the three protocols, metrics to
`<workdir>/cf/metrics.jsonl` + TensorBoard (`<workdir>/cf/tb`), a checkpoint (latest and
best by `select_metric`), early stopping after `patience` evaluations without improvement.
At the end: the best checkpoint is evaluated on test -> `<workdir>/cf/metrics.json`, and
`<workdir>/cf/FINISHED` (`loop.MARKER`) makes a rerun return the stored result without training.

Evaluation (`evaluate`), whole split in fixed-size jitted chunks:
  20 stored candidates (column 0 = target): hit@1, hit@5, hit@10, mrr, ndcg@10_c20
  100 stored negatives + target: hr@10_neg100, ndcg@10_neg100
  full ranking over items 1..N with the user's whole input history masked:
  recall@10/20, ndcg@10/20.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any

from absl import logging
import flax.linen as nn
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
from allmrec_jax.models import cf as cf_models
from allmrec_jax.trainers import loop as loop_lib

PyTree = ct.PyTree
STAGE = "cf"


# ---------------------------------------------------------------------------- setup
def make_model(config, num_items: int) -> cf_models.CFSurface:
  """The configured backbone; sequences are config.data.maxlen long."""
  cf = dict(config.cf)
  cf["maxlen"] = int(config.data.maxlen)
  return cf_models.make_cf_model(cf, num_items)


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam(lr, b1, b2) as in SASRec's code (optional global-norm clipping)."""
  return _adam(float(config.cf.lr), float(config.cf.b1), float(config.cf.b2),
               float(config.cf.grad_clip))


def _adam(lr: float, b1: float, b2: float, clip: float) -> optax.GradientTransformation:
  tx = optax.adam(lr, b1=b1, b2=b2)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def init_params(model: nn.Module, rng: jax.Array, maxlen: int, mesh=None, rules=None
                ) -> PyTree:
  """Unboxed parameters (created sharded on `mesh` when given)."""
  seq = jnp.zeros((1, maxlen), jnp.int32)

  def init_fn(key):
    return model.init({"params": key, "dropout": key}, seq, seq, seq)["params"]
  if mesh is None:
    return nn.unbox(init_fn(rng))
  params, _ = sharding.sharded_init(init_fn, mesh, rules, rng)
  return params


# ---------------------------------------------------------------------------- steps
def train_step(state: dict[str, Any], frozen: PyTree, batch: dict[str, jax.Array],
               rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation, loss_fn,
               grad_splits: int = 1) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One Adam step on a batch {seq, pos, neg: int32[B, L], mask: float32[B]}, in the shape
  of every stage's step (trainers/steps.py; `frozen` is unused: the CF model trains whole).

  state = {"params", "opt_state", "step": int32[]}; dropout key = fold_in(rng, step).
  grad_splits > 1 computes the gradient as the M_i / M weighted sum over that many equal
  row blocks (M_i = the block's loss weight, M the batch's; the same objective as one
  block, since the CF losses are weighted means), each block with dropout key
  fold_in(key, i). The blocks are independent branches of the program, which XLA:CPU runs
  side by side; on small models that is faster than one block (`config.cf.grad_splits`).
  Returns (new state, {"train/loss": float[]}).
  """
  del frozen
  key = jax.random.fold_in(rng, state["step"])

  def loss_of(params, b, k):
    pos_logits, neg_logits = model.apply({"params": params}, b["seq"], b["pos"], b["neg"],
                                         deterministic=False, rngs={"dropout": k})
    return loss_fn(pos_logits, neg_logits, b["pos"], b.get("mask"))

  if grad_splits <= 1:
    loss, grads = jax.value_and_grad(loss_of)(state["params"], batch, key)
  else:
    rows = batch["seq"].shape[0]
    if rows % grad_splits:
      raise ValueError(f"config.cf.grad_splits={grad_splits} must divide the batch size {rows}")
    n = rows // grad_splits
    w = losses.position_weights(batch["pos"], batch.get("mask"))
    total = jnp.maximum(jnp.sum(w), 1.0)
    loss, grads = 0.0, None
    for i in range(grad_splits):
      b = {k: v[i * n:(i + 1) * n] for k, v in batch.items()}
      share = jnp.sum(w[i * n:(i + 1) * n]) / total
      l_i, g_i = jax.value_and_grad(loss_of)(state["params"], b, jax.random.fold_in(key, i))
      loss = loss + share * l_i
      g_i = jax.tree.map(lambda g, s=share: s * g, g_i)
      grads = g_i if grads is None else jax.tree.map(jnp.add, grads, g_i)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {
      "train/loss": loss}


def train_epoch(state, frozen, batches, rng, *, model, tx, loss_fn, grad_splits: int = 1):
  """`train_step` scanned over batches {k: [S, B, ...]} -> (state, float[S] losses)."""
  step = functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                           grad_splits=grad_splits)

  def body(st, b):
    st, m = step(st, frozen, b, rng)
    return st, m["train/loss"]
  return jax.lax.scan(body, state, batches)


@functools.lru_cache(maxsize=16)
def _jitted_epoch(model, loss: str, lr: float, b1: float, b2: float, clip: float,
                  grad_splits: int = 1):
  """jit(train_epoch) cached per (model, optimizer) so reruns in one process reuse it."""
  tx = _adam(lr, b1, b2, clip)

  def run(state, batches, dropout_key):
    return train_epoch(state, None, batches, dropout_key, model=model, tx=tx,
                       loss_fn=losses.CF_LOSSES[loss], grad_splits=grad_splits)
  return jax.jit(run, donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def _jitted_ranks(model):
  return jax.jit(functools.partial(eval_ranks, model))


def eval_ranks(model: nn.Module, params: PyTree, seq: jax.Array, cand20: jax.Array,
               cand101: jax.Array, target: jax.Array, history: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """0-based ranks int32[B] under the three protocols.

  Args:
    seq: int32[B, L] input sequences; cand20: int32[B, 20] and cand101: int32[B, 101]
      (column 0 = target); target: int32[B]; history: int32[B, H] every input item of the
      user (0-padded), masked out of the full ranking together with item 0.
  """
  variables = {"params": params}
  user = model.apply(variables, seq, method="user_representation")
  s20 = model.apply(variables, user, cand20, method="score_users")
  s101 = model.apply(variables, user, cand101, method="score_users")
  num_rows = model.config.num_items + 1
  full = model.apply(variables, user, jnp.arange(num_rows, dtype=jnp.int32),
                     method="score_users")
  rows = jnp.arange(seq.shape[0])[:, None]
  valid = jnp.ones(full.shape, bool).at[rows, history].set(False).at[:, 0].set(False)
  return (metrics_lib.rank_of_target(s20), metrics_lib.rank_of_target(s101),
          metrics_lib.rank_of_item(full, target, valid))


# ---------------------------------------------------------------------------- evaluation
class Evaluator:
  """Whole-split evaluation in fixed-size jitted chunks (one compilation per model)."""

  def __init__(self, model: nn.Module, dataset, maxlen: int, chunk: int = 256,
               cold_fraction: float = 0.35):
    self.model = model
    self.dataset = dataset
    self.maxlen = maxlen
    self.chunk = int(chunk)
    self.cold_fraction = float(cold_fraction)
    self._arrays: dict[str, dict[str, np.ndarray]] = {}
    self._ranks = _jitted_ranks(model)

  def arrays(self, split: str) -> dict[str, np.ndarray]:
    """Evaluation inputs of `split` for users with a target (cached)."""
    if split not in self._arrays:
      ds = self.dataset
      users = ds.eval_users(split).astype(np.int64)
      starts, ends = ds.input_bounds(split)
      lengths = ends[users] - starts[users]
      hmax = max(int(lengths.max()) if users.size else 1, 1)
      from allmrec_jax.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
      self._arrays[split] = {
          "user": users.astype(np.int32),
          "seq": ds.history_matrix(split, self.maxlen)[users],
          "cand20": ds.candidates(split, "neg19")[users],
          "cand101": ds.candidates(split, "neg100")[users],
          "target": ds.targets(split)[users],
          "history": dataset_lib.left_pad(starts[users], ends[users], ds.seq_items, hmax),
      }
    return self._arrays[split]

  def ranks(self, params: PyTree, split: str) -> dict[str, np.ndarray]:
    """{"user", "rank20", "rank101", "rank_full"} numpy int arrays over the split's users."""
    a = self.arrays(split)
    n = a["user"].shape[0]
    out = {"rank20": [], "rank101": [], "rank_full": []}
    for lo in range(0, n, self.chunk):
      idx = np.minimum(lo + np.arange(self.chunk), n - 1)
      r = self._ranks(params, a["seq"][idx], a["cand20"][idx], a["cand101"][idx],
                      a["target"][idx], a["history"][idx])
      take = min(self.chunk, n - lo)
      for name, v in zip(out, r):
        out[name].append(np.asarray(v)[:take])
    res = {k: np.concatenate(v) if v else np.zeros((0,), np.int32) for k, v in out.items()}
    res["user"] = a["user"]
    return res

  def evaluate(self, params: PyTree, split: str, breakdown: bool = False
               ) -> dict[str, float]:
    """`{split}/...` metrics (see module docstring); with breakdowns when available."""
    r = self.ranks(params, split)
    prefix = f"{split}/"
    out = metrics_lib.cf_protocol_metrics(r["rank20"], r["rank101"], r["rank_full"], prefix)
    out[f"{prefix}num_users"] = float(r["user"].size)
    if breakdown:
      for group, mask in _breakdown_groups(self.dataset, split, r["user"],
                                                self.cold_fraction).items():
        if mask.any():
          m = metrics_lib.cf_protocol_metrics(r["rank20"], r["rank101"], r["rank_full"],
                                              f"{prefix}{group}/", weights=mask)
          m[f"{prefix}{group}/num_users"] = float(mask.sum())
          out.update(m)
    return out


def _breakdown_groups(dataset, split: str, users: np.ndarray, cold_fraction: float
                      ) -> dict[str, np.ndarray]:
  """bool[Ue] user masks of the cold / warm target-item groups (scenarios module)."""
  try:
    from allmrec_jax.data import scenarios  # pylint: disable=g-import-not-at-top
    groups = scenarios.cold_warm_users(dataset, split, cold_fraction)
  except (ImportError, AttributeError, ValueError) as e:
    logging.warning("cf: cold/warm breakdown unavailable: %s", e)
    return {}
  return {name: np.isin(users, np.asarray(ids)) for name, ids in groups.items()}


def cold_user_metrics(model: nn.Module, params: PyTree, dataset, maxlen: int,
                      prefix: str = "test/cold_user/") -> dict[str, float]:
  """20-candidate metrics of the dataset's stored cold users (3 items: 2 history + target).

  Empty when the dataset stores none (MovieLens: use `scenarios.cold_user_split`, train on
  its `train` dataset and call this with that split's arrays via `ranks_of_sequences`).
  """
  if getattr(dataset, "cold_user_items", np.zeros((0, 3))).shape[0] == 0:
    return {}
  from allmrec_jax.data import scenarios  # pylint: disable=g-import-not-at-top
  split = scenarios.cold_user_split(dataset, num_users=0)
  a = split.eval_arrays(maxlen=maxlen)
  ranks = ranks_of_sequences(model, params, a["seq"], a["candidates"])
  out = metrics_lib.metrics_from_ranks(ranks, (1, 5, 10), prefix)
  out[f"{prefix}num_users"] = float(ranks.size)
  return out


def ranks_of_sequences(model: nn.Module, params: PyTree, seq: np.ndarray,
                       candidates: np.ndarray, target_col: int = 0) -> np.ndarray:
  """int32[B] rank of candidates[:, target_col] given sequences int32[B, L] (jitted)."""
  @jax.jit
  def f(params, seq, cands):
    user = model.apply({"params": params}, seq, method="user_representation")
    return metrics_lib.rank_of_target(
        model.apply({"params": params}, user, cands, method="score_users"), target_col)
  return np.asarray(f(params, jnp.asarray(seq), jnp.asarray(candidates)))


# ---------------------------------------------------------------------------- io helpers
def _stage_dir(workdir) -> pathlib.Path:
  return pathlib.Path(os.path.expanduser(os.fspath(workdir))) / STAGE


def _get_dataset(config, dataset):
  if dataset is not None:
    return dataset
  from allmrec_jax.data import prepare  # pylint: disable=g-import-not-at-top
  return prepare.prepare_dataset(config.data)


def _on_mesh(tree: PyTree, mesh) -> PyTree:
  """Leaves not already on the mesh (a NamedSharding over it) are replicated on it.

  Placing every leaf under the mesh's NamedSharding, scalars included, makes the inputs of
  the first jitted epoch look exactly like its outputs, so the second epoch does not
  compile the program again.
  """
  rep = sharding.replicated(mesh)

  def place(x):
    if (isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)
        and x.sharding.mesh == mesh):
      return x
    return jax.device_put(x, rep)
  return jax.tree.map(place, tree)


def grad_splits(config) -> int:
  """config.cf.grad_splits, checked against config.cf.batch_size."""
  n = int(config.cf.grad_splits)
  bsz = int(config.cf.batch_size)
  if n < 1 or bsz % n:
    raise ValueError(f"config.cf.grad_splits={n} must be >= 1 and divide "
                     f"config.cf.batch_size={bsz}")
  return n


def _mesh(config):
  rules = sharding.axis_rules(config.mesh.logical_axis_rules)
  return sharding.make_mesh(tuple(config.mesh.shape)), rules


# ---------------------------------------------------------------------------- entry points
def train_and_evaluate(config, workdir, dataset=None, *, stop_after_epoch: int | None = None
                       ) -> tuple[nn.Module, PyTree, dict[str, float]]:
  """Trains `config.cf.model`, returns (model, best params, final metrics).

  Args:
    config: the full config (sections `cf`, `data`, `mesh`, `seed`).
    workdir: run directory; this stage writes `<workdir>/cf/`.
    dataset: a RecDataset (None = `prepare_dataset(config.data)`).
    stop_after_epoch: stop once this epoch is done, as if killed there (no extra
      checkpoint, no test evaluation, no FINISHED marker): tests and drills.
  """
  from allmrec_jax.data import pipelines  # pylint: disable=g-import-not-at-top
  dataset = _get_dataset(config, dataset)
  out_dir = _stage_dir(workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  config_lib.CFTrainConfig.from_config(config)   # every field present, none unknown
  cfc = config.cf
  maxlen = int(config.data.maxlen)
  model = make_model(config, dataset.num_items)
  mesh, rules = _mesh(config)

  if loop_lib.finished(out_dir) is not None:
    logging.info("cf: %s exists, loading the trained model", out_dir / loop_lib.MARKER)
    _, params = load_trained_cf(config, workdir, dataset)
    with open(out_dir / "metrics.json", encoding="utf-8") as f:
      return model, params, json.load(f)

  if cfc.loss not in losses.CF_LOSSES:
    raise ValueError(f"config.cf.loss={cfc.loss!r} is not one of {sorted(losses.CF_LOSSES)}")
  tx = make_optimizer(config)
  seed = int(config.seed)
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  params = init_params(model, init_key, maxlen, mesh, rules)
  # The optimizer moments follow the parameters' shardings; scalars are replicated.
  state = _on_mesh({"params": params, "opt_state": jax.jit(tx.init)(params),
                    "step": jnp.zeros((), jnp.int32)}, mesh)

  mngr = checkpointing.make_manager(out_dir / "ckpt", max_to_keep=2,
                                    best_metric=cfc.select_metric)
  num_epochs = int(cfc.num_epochs)
  # Every process builds the whole global batches and runs the epoch replicated: numpy
  # inputs of a jitted function are taken to be the same in every process, so a
  # per-process slice here would train each process on its own rows, apart.
  pipe = pipelines.cf_train_dataset(dataset, batch_size=int(cfc.batch_size), maxlen=maxlen,
                                    seed=seed, num_epochs=num_epochs + 1,
                                    drop_remainder=bool(cfc.drop_remainder),
                                    process_index=0, process_count=1)
  spe = pipelines.steps_per_epoch(dataset, int(cfc.batch_size),
                                  drop_remainder=bool(cfc.drop_remainder))
  keys = ("seq", "pos", "neg", "mask")

  def epoch_batches(epoch: int, start: int):
    del start                           # one item per epoch: all its batches, stacked
    bs = [pipe[epoch * spe + s] for s in range(spe)]
    yield {k: np.stack([b[k] for b in bs]) for k in keys}

  epoch_fn = _jitted_epoch(model, str(cfc.loss), float(cfc.lr), float(cfc.b1), float(cfc.b2),
                           float(config.cf.grad_clip), grad_splits(config))

  def step_fn(st, batches):
    st, epoch_losses = epoch_fn(st, batches, dropout_key)
    return st, {"train/loss": jnp.mean(epoch_losses)}

  evaluator = Evaluator(model, dataset, maxlen, int(config.cf.eval_batch_size),
                        cold_fraction=float(config.data.cold_fraction))

  def finalize(state) -> dict:
    """The best checkpoint on validation and test; writes metrics.json."""
    best_step = mngr.best_step()
    restored = checkpointing.restore(mngr, step=best_step,
                                     abstract={"params": state["params"]})
    params = restored["params"]
    final = {"best_epoch": int(best_step) if best_step is not None else 0}
    final.update(evaluator.evaluate(params, "valid"))
    t1 = time.perf_counter()
    final.update(evaluator.evaluate(params, "test", breakdown=True))
    final.update(cold_user_metrics(model, params, dataset, maxlen))
    final["test/eval_time_s"] = time.perf_counter() - t1
    final["model"] = str(cfc.model)
    final["seed"] = seed
    with open(out_dir / "metrics.json", "w", encoding="utf-8") as f:
      json.dump(final, f, indent=2, sort_keys=True)
    logging.info("cf test: %s", {k: round(v, 4) for k, v in final.items()
                                 if k.startswith("test/") and isinstance(v, float)})
    return final

  result = loop_lib.run(
      out_dir, name="cf", state=state, step_fn=step_fn,
      data=loop_lib.EpochBatches(epoch_batches, 1), total=num_epochs,
      ckpt_every=int(cfc.ckpt_every), manager=mngr,
      evaluate=lambda params, _: evaluator.evaluate(params, "valid"),
      eval_every=max(int(cfc.eval_every), 1),
      early_stopping=loop_lib.EarlyStopping(cfc.select_metric, int(cfc.patience)),
      unit="epoch", steps_per_call=spe, rate_name="train/seq_per_s",
      count_fn=lambda _: spe * int(cfc.batch_size), finalize=finalize,
      stop_after=stop_after_epoch, progress=bool(config.cf.progress))
  if not result.completed:
    return model, result.state["params"], result.record
  return model, load_trained_cf(config, workdir, dataset)[1], result.final


def load_trained_cf(config, workdir, dataset=None) -> tuple[nn.Module, PyTree]:
  """(model, params) of the best CF checkpoint under `<workdir>/cf/ckpt`.

  Raises FileNotFoundError when there is none (run the `cf` stage first).
  """
  dataset = _get_dataset(config, dataset)
  model = make_model(config, dataset.num_items)
  ckpt = _stage_dir(workdir) / "ckpt"
  if not ckpt.is_dir():
    raise FileNotFoundError(f"no CF checkpoint under {ckpt} (run --config.stages=cf first)")
  mngr = checkpointing.make_manager(ckpt, max_to_keep=1,
                                    best_metric=config.cf.select_metric, read_only=True)
  step = mngr.best_step()
  if step is None:
    raise FileNotFoundError(f"no CF checkpoint under {ckpt} (run --config.stages=cf first)")
  mesh, rules = _mesh(config)
  maxlen = int(config.data.maxlen)
  seq = jnp.zeros((1, maxlen), jnp.int32)
  abstract = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, seq, seq,
                                                 seq)["params"], jax.random.key(0))
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(abstract), shardings)
  restored = checkpointing.restore(mngr, step=step, abstract={"params": like})
  return model, restored["params"]
