"""Orbax checkpoints for every stage: params, optimizer state, step, JSON extras.

Layout: `<workdir>/<stage>/ckpt/<step>/{params,opt_state,extra}`; `extra` is a JSON dict
(epoch, data-iterator state, metrics, anything json-able). The manager keeps the latest
`max_to_keep` steps and, when `best_metric` is given, also the best step by that metric
(saved with `metrics=`), so "latest" resumes a run and "best" serves the final model.
The trainers keep two latest steps: a damaged latest step falls back to the one before.

  mngr = make_manager(workdir / "cf" / "ckpt", max_to_keep=1, best_metric="valid/ndcg@10")
  save(mngr, step, params=params, opt_state=opt_state, extra={"epoch": 3}, metrics=m)
  state = restore(mngr, abstract={"params": params_like, "opt_state": opt_like})
  state["params"], state["opt_state"], state["extra"], state["step"]
  restore(mngr, step=best_step(mngr), ...)   # the best checkpoint
Saving is synchronous (small CF/stage trees; an async save would race a test's restore).
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

PyTree = Any
ARRAY_ITEMS = ("params", "opt_state")


def _to_jsonable(x: Any) -> Any:
  """Python/numpy/jax scalars and containers -> plain JSON types."""
  if isinstance(x, dict):
    return {str(k): _to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return _to_jsonable(np.asarray(x).tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.bool_,)):
    return bool(x)
  return x


def make_manager(directory: str | os.PathLike, max_to_keep: int = 1,
                 best_metric: str | None = None, best_mode: str = "max",
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the latest `max_to_keep` steps (+ the best by `best_metric`).

  Args:
    directory: checkpoint root (created; must be absolute or is made absolute).
    max_to_keep: how many of the most recent steps to keep (>= 1).
    best_metric: key of the `metrics` dict passed to `save` ranking checkpoints; None =
      latest only. Steps saved without metrics never count as best.
    best_mode: "max" (higher is better) or "min".
  """
  if max_to_keep < 1:
    raise ValueError(f"checkpointing: max_to_keep must be >= 1, got {max_to_keep}")
  if best_mode not in ("max", "min"):
    raise ValueError(f"checkpointing: best_mode must be 'max' or 'min', got {best_mode!r}")
  directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  policies = [ocm.LatestN(n=max_to_keep)]
  best_fn = None
  if best_metric is not None:
    def best_fn(metrics, _key=best_metric):
      v = float(metrics.get(_key, math.nan))
      if math.isnan(v):
        return -math.inf if best_mode == "max" else math.inf
      return v
    policies.append(ocm.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"), n=1,
                              keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      best_fn=best_fn, best_mode=best_mode,
      preservation_policy=ocm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=False, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=(*ARRAY_ITEMS, "extra"))


def save(manager: ocp.CheckpointManager, step: int, *, params: PyTree,
         opt_state: PyTree | None = None, extra: dict | None = None,
         metrics: dict | None = None, force: bool = True) -> bool:
  """Saves params (+ opt_state) as array trees and `extra` (+ `metrics`) as JSON.

  `metrics` (json-able floats) rank the step for `best_metric`; they are also stored in
  `extra["metrics"]`. Returns whether a checkpoint was written.
  """
  extra = dict(extra or {})
  if metrics is not None:
    metrics = {k: float(v) for k, v in metrics.items()}
    extra["metrics"] = metrics
  items = {"params": ocp.args.StandardSave(params),
           "extra": ocp.args.JsonSave(_to_jsonable(extra))}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  saved = manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics,
                       force=force)
  manager.wait_until_finished()
  return saved


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  return manager.latest_step()


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The best step by the manager's `best_metric` (the latest one if it has none)."""
  return manager.best_step()


class CheckpointError(RuntimeError):
  """A checkpoint step that cannot be read; the message names its folder."""


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _restore_step(manager: ocp.CheckpointManager, step: int,
                  abstract: dict[str, PyTree]) -> dict[str, Any]:
  step_dir = _step_dir(manager, step)
  if not os.path.isdir(step_dir):
    raise CheckpointError(f"checkpoint {step_dir}: no such step folder")
  present = set(os.listdir(step_dir))
  if "params" not in present:
    raise CheckpointError(f"checkpoint {step_dir}: has no params/ (found {sorted(present)})")
  items = {"extra": ocp.args.JsonRestore()}
  for name in ARRAY_ITEMS:
    if name not in present:
      continue
    like = abstract.get(name)
    if like is not None:
      like = jax.tree.map(_abstract_leaf, like)
    items[name] = ocp.args.StandardRestore(like)
  try:
    out = dict(manager.restore(step, args=ocp.args.Composite(**items)))
  except Exception as e:   # orbax/tensorstore/json raise many types for a damaged step
    msg = " ".join(str(e).split())[:300]
    raise CheckpointError(f"checkpoint {step_dir} is unreadable: {type(e).__name__}: "
                          f"{msg}") from e
  out = {k: out[k] for k in out}
  if not isinstance(out.get("extra"), dict):
    raise CheckpointError(f"checkpoint {step_dir}: extra/ is not a JSON object")
  out["step"] = step
  return out


def restore(manager: ocp.CheckpointManager, step: int | None = None,
            abstract: dict[str, PyTree] | None = None,
            quarantine: bool = False) -> dict[str, Any] | None:
  """Restores a step (default: the latest readable one) -> {"params", "opt_state",
  "extra", "step"}.

  Args:
    step: which step; None = the latest that reads back: a damaged latest step (cut or
      zeroed files, bad metadata, missing params/) is skipped with a warning naming its
      folder and the previous kept step is restored. An explicit step that cannot be read
      raises CheckpointError naming its folder. Returns None when there is no checkpoint.
    abstract: {"params": tree, "opt_state": tree} of arrays or jax.ShapeDtypeStruct (with
      shardings, to restore already sharded); items absent from it are restored as saved
      (plain numpy-like trees), "opt_state" only when present in the checkpoint.
    quarantine: with step=None, move the damaged steps skipped over out of the way (to
      `<ckpt>_damaged/<step>`), so that a resumed run can save those steps again.
  """
  abstract = abstract or {}
  if step is not None:
    return _restore_step(manager, int(step), abstract)
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  for s in steps:
    try:
      out = _restore_step(manager, s, abstract)
    except CheckpointError as e:
      errors.append(str(e))
      logging.warning("%s; trying the previous step", e)
      continue
    if errors and quarantine:
      _quarantine(manager, [t for t in steps if t > s])
    return out
  if errors:
    raise CheckpointError("no readable checkpoint: " + " | ".join(errors))
  return None


def _quarantine(manager: ocp.CheckpointManager, steps: list[int]):
  directory = os.fspath(manager.directory)
  dest_root = directory.rstrip(os.sep) + "_damaged"
  os.makedirs(dest_root, exist_ok=True)
  for s in steps:
    dest = os.path.join(dest_root, str(s))
    if os.path.exists(dest):
      shutil.rmtree(dest)
    shutil.move(_step_dir(manager, s), dest)
    logging.warning("checkpoint %s moved to %s", _step_dir(manager, s), dest)
  manager.reload()


def _abstract_leaf(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, np.ndarray) or np.isscalar(x):
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x
