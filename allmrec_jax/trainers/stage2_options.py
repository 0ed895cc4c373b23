"""Named stage-2 training options beyond the paper's recipe (config.stage2; every default
is the paper's and leaves the step, its optimizer state and the checkpoint as they are).

  schedule, warmup_frac   Adam's learning rate: "constant" (paper), or "warmup_cosine":
                          linear from 0 over warmup_frac of the updates, then a cosine to 0
                          at the last update (optax.warmup_cosine_decay_schedule).
  grad_accum              k > 1: optax.MultiSteps: Adam applies the mean gradient of k
                          micro-batches once every k steps; in between the parameters stay
                          exactly as they are. The loop's steps (max_steps, log_every,
                          ckpt_every, eval_every, metrics.jsonl) count micro-batches; the
                          accumulator is part of the optimizer state, so a checkpoint taken
                          in the middle of an accumulation resumes it exactly.
  curriculum,             "linear": LLaRA's curriculum (Liao et al. 2024): step i trains on
  curriculum_frac         the hybrid prompt (the variant's soft tokens) with probability
                          p = min(1, i / (curriculum_frac x steps)), else on the text-only
                          prompt of the same examples (LLM-Only's, as TALLRec trains).
  two_step_steps          N > 0: CoLLM's two-step tuning (Zhang et al. 2023): steps 0..N-1
                          train only the LoRA adapters on text-only prompts; from step N the
                          adapters are frozen and the projectors train on hybrid prompts.
  history_drop            p > 0: a training prompt lists no history items with probability
                          p (drawn per example and epoch from a hash, so a resumed epoch
                          drops the same ones); the answer then has only [UserRep] to tell
                          whose it is, which teaches the LLM to read x_u rather than only the
                          history tokens that carry the same user.
  history_drop_unit       "example" (the draw above) or "batch": one draw per batch (seed,
                          epoch, batch index), every prompt of the batch with or without
                          its history. The same probability per prompt; a dropped batch is
                          short, where a mixed one is padded to its longest prompt.

Step modes. Under a curriculum or the two-step order the steps of one run differ in the
prompt they build and in the part of the trainable tree they train: a `StepMode` per step,
a pure function of (seed, step) (`StepPlan.mode`), so a resumed run takes the same modes.
The trainable tree's groups ("params": the projectors, "lora": the adapters) then each
have their own optimizer (state, accumulator, schedule), advanced only by the steps that
train the group, as PyTorch's Adam skips a parameter without a gradient: a text-only step
leaves the projectors and their Adam moments exactly as they are, the two-step order's
projectors start a fresh Adam at step N and the adapters keep what step N left them. Each
group's schedule runs over its own number of steps (`StepPlan.group_steps`).
"""

from __future__ import annotations

import dataclasses

from absl import logging
import jax
import numpy as np
import optax

from allmrec_jax.data import sampling

SCHEDULES = ("constant", "warmup_cosine")
CURRICULA = ("none", "linear")
_STREAM_CURRICULUM = 37       # hash stream of the curriculum's draws (data.sampling)
_STREAM_HISTORY_DROP = 41     # hash stream of history_drop's draws
_STREAM_HISTORY_DROP_BATCH = 43   # ... and of its per-batch draws
HISTORY_DROP_UNITS = ("example", "batch")


def validate_options(cfg) -> None:
  """Raises ValueError (one line, naming each --config.stage2 field at fault) for values
  of these options that cannot be right; `cfg` = config.stage2 or a Stage2Config."""
  problems = []

  def bad(field, value, why):
    problems.append(f"--config.stage2.{field}={value!r} {why}")

  if cfg.schedule not in SCHEDULES:
    bad("schedule", cfg.schedule, f"must be one of {', '.join(SCHEDULES)}")
  if not 0.0 <= float(cfg.warmup_frac) < 1.0:
    bad("warmup_frac", cfg.warmup_frac, "must be in [0, 1)")
  if int(cfg.grad_accum) < 1:
    bad("grad_accum", cfg.grad_accum, "must be >= 1")
  if cfg.curriculum not in CURRICULA:
    bad("curriculum", cfg.curriculum, f"must be one of {', '.join(CURRICULA)}")
  if not 0.0 < float(cfg.curriculum_frac) <= 1.0:
    bad("curriculum_frac", cfg.curriculum_frac, "must be in (0, 1]")
  if int(cfg.two_step_steps) < 0:
    bad("two_step_steps", cfg.two_step_steps, "must be >= 0")
  if not 0.0 <= float(cfg.history_drop) < 1.0:
    bad("history_drop", cfg.history_drop, "must be in [0, 1)")
  if cfg.history_drop_unit not in HISTORY_DROP_UNITS:
    bad("history_drop_unit", cfg.history_drop_unit,
        f"must be one of {', '.join(HISTORY_DROP_UNITS)}")
  staged = cfg.curriculum != "none" or int(cfg.two_step_steps) > 0
  if cfg.curriculum != "none" and int(cfg.two_step_steps) > 0:
    bad("two_step_steps", cfg.two_step_steps,
        "and --config.stage2.curriculum are two orders of prompts: choose one")
  if staged and not cfg.train_lora:
    problems.append("--config.stage2.curriculum / two_step_steps need "
                    "--config.stage2.train_lora=True (text-only steps train the adapters)")
  if int(cfg.grad_accum) >= 1 and int(cfg.two_step_steps) % int(cfg.grad_accum):
    bad("two_step_steps", cfg.two_step_steps,
        f"must be a multiple of --config.stage2.grad_accum={cfg.grad_accum}")
  if problems:
    raise ValueError("; ".join(problems))


def drop_history(history: np.ndarray, p: float, seed: int, epoch: int,
                 example_ids: np.ndarray, batch_index: int | None = None) -> np.ndarray:
  """history_drop: `history` (int[B, H], 0 = absent) with every item of a row removed
  with probability p, a pure function of (seed, epoch, example id); with `batch_index`
  (history_drop_unit="batch"), of (seed, epoch, batch index), for all rows at once."""
  if not p:
    return history
  if batch_index is None:
    keys = sampling.hash_u64(_STREAM_HISTORY_DROP, seed, epoch, np.asarray(example_ids))
  else:
    keys = sampling.hash_u64(_STREAM_HISTORY_DROP_BATCH, seed, epoch,
                             np.full(len(history), batch_index, np.int64))
  u = (keys >> np.uint64(11)) * 2.0 ** -53
  return np.where((u < p)[:, None], 0, history).astype(history.dtype)


def learning_rate(cfg, updates: int) -> float | optax.Schedule:
  """config.stage2's learning rate over `updates` optimizer updates: cfg.lr, or the
  warmup_cosine schedule of the update count (0 at count 0, cfg.lr after round(warmup_frac x
  updates) counts, 0 at count `updates`)."""
  if cfg.schedule == "constant":
    return cfg.lr
  if cfg.schedule != "warmup_cosine":
    raise ValueError(f"--config.stage2.schedule={cfg.schedule!r}: one of {SCHEDULES}")
  updates = max(int(updates), 1)
  return optax.warmup_cosine_decay_schedule(
      0.0, float(cfg.lr), warmup_steps=int(round(float(cfg.warmup_frac) * updates)),
      decay_steps=updates, end_value=0.0)


def make_optimizer(cfg, steps: int = 0) -> optax.GradientTransformation:
  """Adam(b1, b2) at `learning_rate(cfg, steps // grad_accum)`, in optax.MultiSteps when
  cfg.grad_accum > 1. `steps`: the micro-batches it will see (a schedule needs them)."""
  k = int(cfg.grad_accum)
  if cfg.schedule != "constant" and steps <= 0:
    raise ValueError(f"--config.stage2.schedule={cfg.schedule!r} needs the run's step count")
  tx = optax.adam(learning_rate(cfg, steps // k), b1=cfg.b1, b2=cfg.b2)
  return optax.MultiSteps(tx, k).gradient_transformation() if k > 1 else tx


@dataclasses.dataclass(frozen=True)
class StepMode:
  """What one step feeds and trains.

  soft: the hybrid prompt (the variant's soft tokens), or the text-only prompt.
  groups: the top-level keys of the trainable tree the step differentiates and updates,
    each under its own optimizer state.
  """
  soft: bool
  groups: tuple[str, ...]

  def step_kwargs(self) -> dict:
    """Overrides of `stage2.train_step`'s keywords for this mode (a text-only step has no
    soft token and no match term)."""
    kw = {"groups": self.groups}
    if not self.soft:
      kw.update(use_user=False, use_items=False, match_weight=0.0)
    return kw


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The mode of every step of one stage-2 run.

  total: the run's steps; seed: config.seed; soft: the variant's prompts carry soft tokens
  (a text-only variant, TALLRec, has one mode whatever the options say); curriculum,
  curriculum_frac, two_step_steps: config.stage2.
  """
  total: int
  seed: int = 0
  soft: bool = True
  curriculum: str = "none"
  curriculum_frac: float = 1.0
  two_step_steps: int = 0

  @classmethod
  def from_config(cls, cfg, *, total: int, seed: int, soft: bool) -> StepPlan:
    return cls(int(total), int(seed), bool(soft), str(cfg.curriculum),
               float(cfg.curriculum_frac), int(cfg.two_step_steps))

  @property
  def staged(self) -> bool:
    """Steps differ in mode (False: every step is the default one, `mode` is None)."""
    return self.soft and (self.curriculum != "none" or self.two_step_steps > 0)

  def hybrid(self, steps) -> np.ndarray:
    """bool[...]: whether each (0-based) step of `steps` builds the hybrid prompt."""
    steps = np.asarray(steps, np.int64)
    if not self.staged:
      return np.full(steps.shape, self.soft)
    if self.two_step_steps:
      return steps >= self.two_step_steps
    p = np.minimum(1.0, steps / (self.curriculum_frac * max(self.total, 1)))
    u = (sampling.hash_u64(_STREAM_CURRICULUM, self.seed, steps) >> np.uint64(11)) * 2.0 ** -53
    return u < p

  def mode(self, step: int) -> StepMode | None:
    """The mode of `step` (None: not staged, the trainer's default step)."""
    if not self.staged:
      return None
    if bool(self.hybrid(step)):
      return StepMode(True, ("params",) if self.two_step_steps else ("params", "lora"))
    return StepMode(False, ("lora",))

  def group_steps(self) -> dict[str, int]:
    """{group: the steps in [0, total) that train it} (staged plans)."""
    n_hybrid = int(self.hybrid(np.arange(self.total)).sum())
    if self.two_step_steps:
      return {"params": n_hybrid, "lora": self.total - n_hybrid}
    return {"params": n_hybrid, "lora": self.total}


def make_optimizers(cfg, plan: StepPlan
                    ) -> optax.GradientTransformation | dict[str, optax.GradientTransformation]:
  """The run's optimizer: one over the whole trainable tree, or under a staged plan one per
  group, each scheduled over the steps that train it. Warns about steps that cannot train."""
  k = int(cfg.grad_accum)
  if plan.total % k:
    logging.warning("stage2: %d steps are not a multiple of config.stage2.grad_accum=%d; "
                    "the last %d micro-batches make no update", plan.total, k, plan.total % k)
  if plan.staged and plan.two_step_steps >= plan.total:
    logging.warning("stage2: config.stage2.two_step_steps=%d >= the run's %d steps; the "
                    "projectors do not train", plan.two_step_steps, plan.total)
  if not plan.staged:
    return make_optimizer(cfg, plan.total)
  return {g: make_optimizer(cfg, n) for g, n in plan.group_steps().items()}


def init_opt_state(optimizer, params: dict):
  """optimizer.init(params), or {group: its optimizer's init(params[group])}."""
  if isinstance(optimizer, dict):
    return {g: tx.init(params[g]) for g, tx in optimizer.items()}
  return optimizer.init(params)


def group_update(objective, params: dict, opt_state: dict, optimizers: dict,
                 groups: tuple[str, ...]):
  """One step on `groups` of `params` only: the gradient of objective(params) w.r.t. those
  groups (the others are constants of the step), each updated by its own optimizer; the
  other groups and their optimizer states come back as they are.

  objective: params -> (total, aux). Returns (aux, grads of the groups, params, opt_state).
  """
  def of_groups(sub):
    return objective({**params, **sub})

  (_, aux), grads = jax.value_and_grad(of_groups, has_aux=True)({g: params[g] for g in groups})
  params, opt_state = dict(params), dict(opt_state)
  for g in groups:
    updates, opt_state[g] = optimizers[g].update(grads[g], opt_state[g], params[g])
    params[g] = optax.apply_updates(params[g], updates)
  return aux, grads, params, opt_state
