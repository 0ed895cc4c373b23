"""Stage 2: the frozen LLM learns to use the joint embeddings (soft prompts).

Trainable: the projectors {"user_proj": F_U, "item_proj": F_I}. Frozen and passed as a
separate argument: the LLM parameters and the item table fed to F_I (the stage-1 joint
embeddings e_i = f_I^enc(E_i), computed once). The CF model is frozen too, so the user
representations x_u are computed once per example (`user_representations`).

Loss: causal-LM cross-entropy on the target title tokens and EOS only; the LM head is
applied only at those positions (B x Tt rows instead of B x L).

Options beyond the paper's recipe (a learning-rate schedule, gradient accumulation, LLaRA's
curriculum, CoLLM's two-step order, history dropout) live in `stage2_options.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable, Iterator

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from allmrec_jax import common_types as ct
from allmrec_jax import config_lib
from allmrec_jax import logging_utils
from allmrec_jax import sharding
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import pipelines
from allmrec_jax.data import prompts as prompts_lib
from allmrec_jax.data import sampling
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.models import soft_prompt
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import stage2_options as options_lib
from allmrec_jax.trainers import steps as steps_lib
from allmrec_jax.trainers import variants as variants_lib

PyTree = ct.PyTree


# ---------------------------------------------------------------------------- loss / step
def lm_loss(proj_params: PyTree, llm_params: PyTree, item_table: jax.Array,
            batch: dict[str, jax.Array], *, llm: nn.Module, projectors: nn.Module,
            use_user: bool = True, use_items: bool = True) -> tuple[jax.Array, dict]:
  """Mean token cross-entropy of the target title + EOS given the soft prompt.

  loss = sum_{b,t} w[b,t] * -log p(target[b,t] | prefix) / sum_{b,t} w[b,t]
  (the token-mean of transformers' causal-LM loss with the prompt labels masked).

  Args:
    proj_params: {"params": {"user_proj", "item_proj"}} (differentiated), plus the LLM's
      LoRA adapters under "lora" when stage 2 trains them (config.stage2.train_lora).
    llm_params: {"params": ...} of the frozen LLM.
    item_table: float[N+1, K] item embeddings fed to F_I.
    batch: PromptBatch arrays + "user_rep" float[B, D].
  Returns:
    (loss, {"tokens": number of target tokens}).
  """
  if use_user or use_items:
    embeds = soft_prompt.soft_prompt_embeds(llm, llm_params, projectors, proj_params,
                                            item_table, batch, use_user=use_user,
                                            use_items=use_items)
  else:    # no soft token (text-only prompts, TALLRec): the token embeddings as they are
    embeds = llm.apply(llm_params, batch["input_ids"], method=llm.embed)
  llm_vars = lora_lib.with_adapters(llm_params, proj_params)
  _, aux = llm.apply(llm_vars, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                     compute_logits=False)
  hidden = jnp.take_along_axis(aux["hidden"], batch["target_pos"][..., None], axis=1)
  logits = llm.apply(llm_params, hidden, method=llm.logits).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_ids"])
  w = batch["target_mask"].astype(jnp.float32)
  n = jnp.sum(w)
  return jnp.sum(ce * w) / jnp.maximum(n, 1.0), {"tokens": n}


def _unit_rows(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def user_match_loss(proj_params: PyTree, item_table: jax.Array, batch: dict[str, jax.Array],
                    *, projectors: nn.Module, temperature: float,
                    negatives: str = "prompt") -> jax.Array:
  """InfoNCE of [U] against item tokens (config.stage2.user_match_weight; a named variant
  beyond the paper, whose stage 2 has the LM loss only).

  logits[b, c] = cos(F_U(x_u[b]), F_I(e[c])) / temperature with the target item as the
  positive. `negatives` (config.stage2.user_match_negatives): "prompt" = c runs over the
  prompt's candidates `cand_items[b]`; "catalog" = over every item of the table (rows 1..N;
  row 0 is padding), a full-softmax retrieval loss, whose examples are the prompts' plus,
  when the batch has them (config.stage2.user_match_batch), the extra training examples
  `match_user_rep` / `match_target` (no prompt, no LLM pass: a few MLP rows each). It asks
  F_U directly to point at the target's item token, which the frozen LM can then copy from
  (the in_quotes layout).
  """
  if negatives == "catalog":
    reps, targets = batch["user_rep"], batch["target_item"]
    if "match_user_rep" in batch:
      reps = jnp.concatenate([reps, batch["match_user_rep"].astype(reps.dtype)], axis=0)
      targets = jnp.concatenate([targets, batch["match_target"]], axis=0)
    u = _unit_rows(projectors.apply(proj_params, reps, method=projectors.user))
    c = _unit_rows(projectors.apply(proj_params, item_table[1:], method=projectors.item))
    logits = jnp.einsum("be,ne->bn", u, c) / temperature
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets - 1))
  if negatives != "prompt":
    raise ValueError(f"config.stage2.user_match_negatives must be 'prompt' or 'catalog', "
                     f"got {negatives!r}")
  u = _unit_rows(projectors.apply(proj_params, batch["user_rep"], method=projectors.user))
  c = _unit_rows(projectors.apply(proj_params, item_table[batch["cand_items"]],
                                  method=projectors.item))
  logits = jnp.einsum("be,bce->bc", u, c) / temperature
  labels = (batch["cand_items"] == batch["target_item"][:, None]).astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy(logits, labels))


make_optimizer = options_lib.make_optimizer    # (cfg, steps) -> Adam; lr, schedule, grad_accum


def train_step(state: dict, frozen: dict, batch: dict[str, jax.Array], rng: jax.Array, *,
               llm, projectors, optimizer, use_user, use_items, match_weight: float = 0.0,
               match_temperature: float = 0.1, match_negatives: str = "prompt",
               groups: tuple[str, ...] | None = None) -> tuple[dict, dict]:
  """One Adam step on the projectors (and LoRA adapters), in the shape of every stage's
  step (trainers/steps.py): state = {"params", "opt_state", "step"}, frozen = {"llm": the
  LLM's variables, "items": the item table fed to F_I}; `rng` is unused (no dropout).

  The objective is the LM loss (reported as train/loss), plus match_weight x
  `user_match_loss` when match_weight > 0 (reported as train/match_loss). `groups`: train
  only these top-level keys of the tree, each with its own optimizer (`optimizer` and
  opt_state are then dicts by group; `stage2_options.group_update`)."""
  del rng
  llm_params, item_table = frozen["llm"], frozen["items"]

  def objective(params):
    loss, aux = lm_loss(params, llm_params, item_table, batch, llm=llm,
                        projectors=projectors, use_user=use_user, use_items=use_items)
    total = loss
    if match_weight > 0:
      aux["match"] = user_match_loss(params, item_table, batch, projectors=projectors,
                                     temperature=match_temperature,
                                     negatives=match_negatives)
      total = loss + match_weight * aux["match"]
    return total, (loss, aux)

  if groups is None:
    (_, (loss, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
  else:
    (loss, aux), grads, params, opt_state = options_lib.group_update(
        objective, state["params"], state["opt_state"], optimizer, groups)
  metrics = {"train/loss": loss, "train/tokens": aux["tokens"],
             "train/grad_norm": optax.global_norm(grads)}
  if "match" in aux:
    metrics["train/match_loss"] = aux["match"]
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def init_projectors(projectors: nn.Module, rng: jax.Array, item_dim: int,
                    user_dim: int) -> PyTree:
  return nn.unbox(projectors.init(rng, jnp.zeros((1, item_dim)), jnp.zeros((1, user_dim))))


# ---------------------------------------------------------------------------- examples
@dataclasses.dataclass(frozen=True)
class Examples:
  """Training examples of stage 2 (one per user and target position).

  users:   int32[X] user of each example
  history: int32[X, H] the last H items before the target (0 = absent, left-padded)
  seq:     int32[X, maxlen] CF input for x_u (left-padded)
  targets: int32[X] target item
  """
  users: np.ndarray
  history: np.ndarray
  seq: np.ndarray
  targets: np.ndarray


def training_examples(ds: dataset_lib.RecDataset, *, maxlen: int, num_history: int,
                      positions_per_user: int = 1,
                      users: np.ndarray | None = None) -> Examples:
  """The paper's examples: target = last training item, input = the items before it.

  positions_per_user > 1 also uses the k-th last training items as targets (k <= P).
  """
  starts, ends = ds.train_bounds()
  if users is None:
    users = np.arange(ds.num_users)
  users = np.asarray(users, np.int64)
  rows_u, rows_end = [], []
  for k in range(1, positions_per_user + 1):
    end = ends[users] - k                      # input = items[start:end], target items[end]
    ok = end - starts[users] >= 1
    rows_u.append(users[ok])
    rows_end.append(end[ok])
  u = np.concatenate(rows_u)
  end = np.concatenate(rows_end)
  seq = dataset_lib.left_pad(starts[u], end, ds.seq_items, maxlen)
  return Examples(users=u.astype(np.int32), history=seq[:, -num_history:],
                  seq=seq, targets=ds.seq_items[end].astype(np.int32))


def sample_candidates(ds: dataset_lib.RecDataset, index: sampling.ExclusionIndex,
                      users: np.ndarray, targets: np.ndarray, example_ids: np.ndarray,
                      num_candidates: int, seed: int, epoch: int) -> np.ndarray:
  """int32[B, C]: the target + C-1 negatives outside the user's history, shuffled.

  Keyed by (seed, epoch, example id) only, so a resumed epoch draws the same sets (the
  streams of `data.pipelines`' stage-2 batches).
  """
  draw = sampling.hashed_draw(ds.num_items, seed, epoch, example_ids,
                              pipelines.STREAM_STAGE2)
  negs = sampling.sample_excluding(users, num_candidates - 1, index, draw, distinct=True,
                                   fallback_seed=seed + epoch)
  cands = np.concatenate([targets[:, None], negs], axis=1)
  return pipelines.shuffle_candidates(cands, example_ids, seed=seed, epoch=epoch,
                                      stream=pipelines.STREAM_STAGE2_SHUFFLE)[0]


def epoch_order(num: int, seed: int, epoch: int) -> np.ndarray:
  return np.argsort(sampling.hash_u64(23, seed, epoch, np.arange(num)), kind="stable")


@functools.partial(jax.jit, static_argnums=0)
def _user_rep(cf_model, cf_params, seq):
  return cf_model.apply(cf_params, seq, method=cf_model.user_representation)


def user_representations(cf_model, cf_params, seq: np.ndarray, batch: int = 1024) -> np.ndarray:
  """float32[X, D] x_u = the frozen CF model's user representation of each sequence (one
  compiled program per model and row count, shared by every call)."""
  out = [np.asarray(_user_rep(cf_model, cf_params, seq[i:i + batch]))
         for i in range(0, len(seq), batch)]
  return np.concatenate(out, 0) if out else np.zeros((0, 0), np.float32)


def iterate_batches(ex: Examples, user_rep: np.ndarray, builder: prompts_lib.PromptBuilder,
                    ds: dataset_lib.RecDataset, index: sampling.ExclusionIndex, *,
                    batch_size: int, num_candidates: int, seed: int, epoch: int,
                    start_batch: int = 0, soft: bool | Callable[[int], bool] = True,
                    shard: tuple[int, int] = (0, 1), match_batch: int = 0,
                    history_drop: float = 0.0,
                    history_drop_unit: str = "example") -> Iterator[tuple[int, dict]]:
  """Yields (batch index, arrays) of one epoch, from `start_batch` (resume).

  `soft`: soft-token prompts, or a function batch index -> bool (a curriculum's choice).
  The last incomplete batch is dropped (static shapes). `shard` = (process index, count):
  each host builds the global batch (one prompt width) and keeps its rows. `match_batch` >
  0 adds that many match-term examples (`match_user_rep`, `match_target`), drawn by a hash
  of (seed, epoch, batch index), so a resumed epoch draws the same ones. `history_drop`,
  `history_drop_unit`: config.stage2's (`stage2_options.drop_history`).
  """
  order = epoch_order(len(ex.users), seed, epoch)
  n_batches = len(order) // batch_size
  pi, pc = shard
  rows = slice(pi * (batch_size // pc), (pi + 1) * (batch_size // pc))
  for j in range(start_batch, n_batches):
    sel = order[j * batch_size:(j + 1) * batch_size]
    cands = sample_candidates(ds, index, ex.users[sel], ex.targets[sel], sel,
                              num_candidates, seed, epoch)
    hist = options_lib.drop_history(ex.history[sel], history_drop, seed, epoch, sel,
                                    j if history_drop_unit == "batch" else None)
    pb = builder.build(hist, cands, ex.targets[sel],
                       soft=soft(j) if callable(soft) else soft, padding="right")
    arrays = {k: v[rows] for k, v in pb.arrays().items()}
    arrays["user_rep"] = user_rep[sel[rows]].astype(np.float32)
    arrays["cand_items"] = cands[rows].astype(np.int32)
    arrays["target_item"] = ex.targets[sel[rows]].astype(np.int32)
    if match_batch:
      keys = sampling.hash_u64(29, seed, epoch, j * len(ex.users) + np.arange(len(ex.users)))
      extra = np.argsort(keys, kind="stable")[:match_batch]
      extra = extra[pi * (match_batch // pc):(pi + 1) * (match_batch // pc)]
      arrays["match_user_rep"] = user_rep[extra].astype(np.float32)
      arrays["match_target"] = ex.targets[extra].astype(np.int32)
    yield j, arrays


# ---------------------------------------------------------------------------- trainer
def match_options(cfg, enabled: bool = True) -> dict[str, float]:
  """Stage2Trainer's match_weight / match_temperature from config.stage2 (0 when the
  ablation drops a soft token, e.g. the MLP-LLM or w/o-user runs keep the LM loss)."""
  return {"match_weight": float(cfg.user_match_weight) if enabled else 0.0,
          "match_temperature": float(cfg.user_match_temperature),
          "match_negatives": str(cfg.user_match_negatives)}


def match_batch(cfg, enabled: bool = True) -> int:
  """Extra match-term examples per step (config.stage2.user_match_batch; 0 when the match
  term is off)."""
  if not enabled or not float(cfg.user_match_weight):
    return 0
  return int(cfg.user_match_batch)


class Stage2Trainer:
  """Builds the jitted step with explicit shardings and runs epochs with checkpoints."""

  def __init__(self, *, llm, llm_params, projectors, item_table, optimizer, mesh=None,
               rules=None, use_user=True, use_items=True, match_weight: float = 0.0,
               match_temperature: float = 0.1, match_negatives: str = "prompt"):
    self.llm, self.projectors, self.optimizer = llm, projectors, optimizer
    self.mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    self.rules = rules
    self.llm_params = llm_params
    self.item_table = jax.device_put(jnp.asarray(item_table, jnp.float32),
                                     sharding.replicated(self.mesh))
    if match_weight and not (use_user and use_items):
      raise ValueError("config.stage2.user_match_weight > 0 needs both the user and the "
                       "item tokens (use_user and use_items)")
    self._step_fn = functools.partial(train_step, llm=llm, projectors=projectors,
                                      optimizer=optimizer, use_user=use_user,
                                      use_items=use_items, match_weight=float(match_weight),
                                      match_temperature=float(match_temperature),
                                      match_negatives=str(match_negatives))
    self._step = None                       # the step last run (steps.compile_step), of
    self._steps = {}                        #   one compiled per StepMode (None: the default)
    self.frozen = {"llm": llm_params, "items": self.item_table}
    self._rng = jax.random.PRNGKey(0)
    self.compiled_shapes: set[tuple] = set()
    self._replicated: set[tuple] = set()

  def init_state(self, trainable: PyTree) -> dict:
    """State of the trainable tree: projectors replicated; boxed leaves (the LLM's LoRA
    adapters) sharded by their logical axes like the base kernels."""
    rep = sharding.replicated(self.mesh)
    shapes = nn.unbox(trainable)
    shardings = jax.tree.map(lambda s, a: sharding.fit_sharding(s, a.shape),
                             sharding.logical_shardings(trainable, self.mesh, self.rules),
                             shapes)
    # A host copy first: the step donates the state, the caller keeps its arrays.
    params = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), shapes, shardings)
    # Moments laid out like their parameters; the rest (Adam's count) replicated.
    opt_state = jax.tree.map(
        lambda x: x if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
        else jax.device_put(x, rep), options_lib.init_opt_state(self.optimizer, params))
    return steps_lib.new_state(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), rep))

  def put_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> the global batch over the mesh's data x fsdp axes; an array
    whose rows do not divide them is replicated, with a warning (once per array and
    shape)."""
    seen = set()
    out = sharding.put_batch(self.mesh, arrays, process_local=True, replicated_out=seen)
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    for k, shape in sorted(seen - self._replicated):
      self._replicated.add((k, shape))
      logging.warning("stage2: %s has %d rows, not a multiple of the mesh's %d data "
                      "shards; replicated on every device (make config.stage2."
                      "batch_size a multiple of %d to shard it)", k, shape[0], shards,
                      shards)
    return out

  def step(self, state: dict, arrays: dict[str, np.ndarray],
           mode: options_lib.StepMode | None = None) -> tuple[dict, dict]:
    self.compiled_shapes.add(arrays["input_ids"].shape)
    batch = self.put_batch(arrays)
    with sharding.activate(self.mesh, self.rules):
      if mode not in self._steps:
        fn = self._step_fn if mode is None else functools.partial(self._step_fn,
                                                                  **mode.step_kwargs())
        self._steps[mode] = steps_lib.compile_step(fn, state, self.frozen)
      self._step = self._steps[mode]
      return self._step(state, self.frozen, batch, self._rng)


def train(config, workdir: str | os.PathLike, ds: dataset_lib.RecDataset, *,
          variant: variants_lib.Variant, llm, llm_params, builder: prompts_lib.PromptBuilder,
          user_rep_fn, item_table: np.ndarray, mesh=None, rules=None,
          users: np.ndarray | None = None, restore_only: bool = False,
          eval_fn=None) -> PyTree:
  """Trains `variant` (resuming from `<workdir>/<variant.folder>/ckpt`); returns its params
  ({"params": projectors}, plus {"lora": adapters} when it trains LoRA).

  A text-only variant (TALLRec) has no projectors: the LLM's LoRA adapters are its only
  trainable weights ({"lora": adapters}).

  With `restore_only`, a run whose checkpoint has not reached the configured number of
  steps raises instead of training (for tools that only read a finished run).

  Args:
    config: the full config (uses `config.stage2`, `config.data.maxlen`, `config.seed`).
    variant: what the prompts carry and what trains (`trainers/variants.py`).
    ds: the dataset; `users` restricts training to a subset (few-shot).
    llm, llm_params: the frozen LLM.
    builder: the PromptBuilder of `ds`.
    user_rep_fn: seq int32[X, maxlen] -> float32[X, D] (the frozen CF model).
    item_table: float[N+1, K] fed to F_I (joint embeddings; CF table for MLP-LLM).
    eval_fn: params -> {name: float}, run every `config.stage2.eval_every` steps and at
      the last step (validation ranking); its values go to metrics.jsonl and TensorBoard,
      and the curve to `<name>/learning_curve.png`.
  """
  from allmrec_jax import checkpointing  # pylint: disable=import-outside-toplevel
  cfg = config_lib.Stage2Config.from_config(config)
  options_lib.validate_options(cfg)
  name = variant.folder
  soft, use_user, use_items = variant.soft, variant.use_user, variant.use_items
  out_dir = pathlib.Path(workdir) / name
  out_dir.mkdir(parents=True, exist_ok=True)
  ex = training_examples(ds, maxlen=config.data.maxlen, num_history=cfg.num_history,
                         positions_per_user=cfg.positions_per_user, users=users)
  user_rep = user_rep_fn(ex.seq)
  index = pipelines.train_exclusion_index(ds)
  n_batches = len(ex.users) // cfg.batch_size
  if n_batches == 0:
    raise ValueError(f"stage2: {len(ex.users)} training examples < batch size "
                     f"{cfg.batch_size} (config.stage2.batch_size)")
  max_steps = cfg.num_epochs * n_batches
  if cfg.max_steps > 0:
    max_steps = min(max_steps, cfg.max_steps)
  plan = options_lib.StepPlan.from_config(cfg, total=max_steps, seed=config.seed, soft=soft)
  llm_dim = llm.config.embed_dim     # the width of the input embeddings
  projectors = projectors_lib.Stage2Projectors(item_table.shape[1], user_rep.shape[1], llm_dim)
  trainer = Stage2Trainer(llm=llm, llm_params=llm_params, projectors=projectors,
                          item_table=item_table, optimizer=options_lib.make_optimizers(
                              cfg, plan), mesh=mesh, rules=rules, use_user=use_user,
                          use_items=use_items, **match_options(cfg, use_user and use_items))
  if soft:
    trainable = init_projectors(projectors, jax.random.PRNGKey(config.seed),
                                item_table.shape[1], user_rep.shape[1])
  else:
    trainable = {}
  if variant.trains_lora(cfg.train_lora):
    trainable["lora"] = lora_lib.init_adapters(llm, llm_params,
                                               jax.random.fold_in(jax.random.PRNGKey(
                                                   config.seed), 1))
  state = trainer.init_state(trainable)
  manager = checkpointing.make_manager(out_dir / "ckpt", max_to_keep=2)
  done = loop_lib.finished(out_dir)
  if restore_only and (done is None or int(done.get("steps", -1)) < max_steps):
    raise ValueError(f"stage2: {out_dir} is not a finished run of {max_steps} steps for "
                     "this config (pass the run's own --config.* overrides)")
  shard = (jax.process_index(), jax.process_count())

  def epoch_batches(epoch: int, start: int):    # (the step's mode, its arrays)
    first = epoch * n_batches
    for j, arrays in iterate_batches(
        ex, user_rep, builder, ds, index, batch_size=cfg.batch_size,
        num_candidates=cfg.num_candidates, seed=config.seed, epoch=epoch, start_batch=start,
        shard=shard, soft=lambda j: bool(plan.hybrid(first + j)),
        match_batch=match_batch(cfg, use_user and use_items),
        history_drop=float(cfg.history_drop), history_drop_unit=cfg.history_drop_unit):
      yield plan.mode(first + j), arrays

  def plot(_):
    if jax.process_index() == 0:
      logging_utils.plot_learning_curve(out_dir / "metrics.jsonl",
                                        out_dir / "learning_curve.png", name)

  result = loop_lib.run(
      out_dir, name=name, state=state, step_fn=lambda st, b: trainer.step(st, b[1], b[0]),
      data=loop_lib.EpochBatches(epoch_batches, n_batches), total=max_steps,
      ckpt_every=cfg.ckpt_every, manager=manager, log_every=cfg.log_every,
      evaluate=None if eval_fn is None else lambda params, _: eval_fn(params),
      eval_every=int(cfg.eval_every), eval_at_start=True, on_eval=plot,
      count_fn=lambda b: b[1]["attention_mask"].sum(),
      rate_name="train/nonpad_tokens_per_s", finalize=lambda _: {"steps": max_steps})
  state = result.state
  logging.info("%s: %d steps; compiled shapes %s", name, result.iteration,
               sorted(trainer.compiled_shapes))
  return jax.device_get(state["params"])
