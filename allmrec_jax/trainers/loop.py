"""The one training loop of every stage (CF, stage 1, stage 2) and of the experiment scripts.

A stage hands `run` a step function, a resumable data iterator and its evaluator; the loop
owns the rest: iteration, the log / evaluation / checkpoint cadence, resume (train state +
the data iterator's state, one checkpoint format), preemption (SIGTERM / SIGINT), early
stopping and the finished marker.

  result = loop.run(stage_dir, name="stage1", state=state, step_fn=step, data=iterator,
                    total=1000, ckpt_every=100, manager=manager,
                    finalize=lambda state: {"steps": 1000})

  step_fn(state, batch) -> (state, metrics)   metrics: {"train/<name>": float[]}
  data: next(data) -> batch; data.get_state() -> JSON-able; data.set_state(that)
  evaluate(params, i) -> {name: float}         every `eval_every` iterations and at the end

One iteration is one call of `step_fn`: a training step, or (CF) a jitted scan over an
epoch's steps (`unit="epoch"`, `steps_per_call` = steps per epoch).

Checkpoint `extra` (one format for every stage): {"iteration": i, "state_step": the state's
step counter, "data": the iterator's state after batch i, "loop": early-stopping record}.

Preemption: SIGTERM or SIGINT during the loop finishes the current iteration, saves a
checkpoint there, logs one line naming the step, and raises `Preempted`, a SystemExit
with status EXIT_PREEMPTED; on multi-process runs the processes agree on the step through
JAX's preemption sync point (`jax.experimental.multihost_utils.reached_preemption_sync_point`, which needs
`jax.distributed.initialize`), as MaxText does. A rerun resumes from that checkpoint.

Every stage folder (`cf/`, `stage1/`, `stage2/`, and the variants' `stage2_*/`) holds a
`FINISHED` file (a JSON record) once its training is complete; a rerun that finds it
restores the result instead of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from allmrec_jax import checkpointing
from allmrec_jax import logging_utils

MARKER = "FINISHED"
EXIT_PREEMPTED = 143       # a launcher's exit status after a preemption (128 + SIGTERM)


def finished(stage_dir) -> dict | None:
  """The stage's finished record, or None while it is unfinished."""
  path = pathlib.Path(stage_dir) / MARKER
  if not path.is_file():
    return None
  text = path.read_text().strip()
  try:
    return json.loads(text) if text else {}
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: unreadable finished marker ({e}); delete it to train the "
                     "stage again") from None


def mark_finished(stage_dir, record: dict) -> None:
  """Writes the finished record (process 0 only, like every other output)."""
  if jax.process_index() == 0:
    (pathlib.Path(stage_dir) / MARKER).write_text(json.dumps(record) + "\n")


class Preempted(SystemExit):
  """The run received SIGTERM / SIGINT and saved a checkpoint at `step`: a SystemExit with
  status EXIT_PREEMPTED, so that every launcher (train, tables, experiment scripts) exits
  with it, its `finally` blocks and context managers (the run lock) unwound, no traceback."""

  def __init__(self, name: str, step: int, unit: str):
    super().__init__(EXIT_PREEMPTED)
    self.step = step
    self.message = (f"{name}: preempted at {unit} {step}; checkpoint saved, rerun the same "
                    "command to resume from it")


class _SignalFlag:
  """Set by SIGTERM / SIGINT while installed (main thread only; elsewhere a no-op)."""

  def __init__(self):
    self.raised: int | None = None

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    def handler(signum, _frame):
      self.raised = signum
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)


def _preemption_due(flag: _SignalFlag, step: int) -> bool:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step)) or (
          flag.raised is not None)
    except RuntimeError:   # no preemption service (jax.distributed without it)
      pass
  return flag.raised is not None


class EpochBatches:
  """A resumable iterator over epochs of batches: `make_epoch(epoch, start)` yields the
  batches of `epoch` from index `start`; state {"epoch", "next_batch"}."""

  def __init__(self, make_epoch: Callable[[int, int], Iterator], batches_per_epoch: int):
    self._make, self._per_epoch = make_epoch, int(batches_per_epoch)
    self.epoch, self.next_batch, self._it = 0, 0, None

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = iter(self._make(self.epoch, self.next_batch))
    item = next(self._it)
    self.next_batch += 1
    if self.next_batch >= self._per_epoch:
      self.epoch, self.next_batch, self._it = self.epoch + 1, 0, None
    return item

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "next_batch": self.next_batch}

  def set_state(self, state: dict) -> None:
    self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
    self._it = None


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stop after `patience` evaluations without improving `metric` (higher is better)."""
  metric: str
  patience: int


@dataclasses.dataclass
class LoopResult:
  state: dict
  iteration: int           # iterations done
  completed: bool          # reached `total` or stopped early (finalized, marker written)
  record: dict             # the last metrics row
  final: dict | None       # what `finalize` returned


def _floats(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run(stage_dir, *, name: str, state: dict, step_fn, data, total: int, ckpt_every: int,
        manager, log_every: int = 1, evaluate: Callable[[Any, int], dict] | None = None,
        eval_every: int = 0, eval_at_start: bool = False, on_eval=None,
        early_stopping: EarlyStopping | None = None, unit: str = "step",
        steps_per_call: int = 1, count_fn: Callable[[Any], float] | None = None,
        rate_name: str = "", finalize: Callable[[dict], dict] | None = None,
        stop_after: int | None = None, progress: bool = True) -> LoopResult:
  """Trains `state` for `total` iterations of `step_fn` over `data`, resuming from the latest
  readable checkpoint of `manager`.

  Args:
    stage_dir: the stage's folder (metrics.jsonl, TensorBoard, FINISHED).
    state: {"params", "opt_state", "step"} already placed on its devices; a checkpoint
      restores into the same shardings.
    step_fn: (state, batch) -> (state, metrics).
    data: the resumable iterator (`get_state` / `set_state`).
    total: iterations in all; ckpt_every / log_every / eval_every: cadences in iterations
      (the last iteration always logs, evaluates and saves).
    evaluate: (params, iteration) -> metrics, merged into that iteration's row;
      `eval_at_start` also evaluates before the first iteration; `on_eval(iteration)` runs
      after an evaluated row is written (e.g. to plot the curve).
    early_stopping: stop once its metric has not improved for `patience` evaluations;
      evaluated checkpoints carry the evaluation's metrics (for a manager's best step).
    unit: "step" or "epoch": the name of the iteration counter in metrics.jsonl rows;
      `steps_per_call` training steps per iteration (row key "step" = their count).
    count_fn, rate_name: items in a batch -> `rate_name` = items per second in the row.
    finalize: state -> record, once training is complete (not when interrupted): final
      evaluation and outputs; its record goes into the FINISHED marker.
    stop_after: stop once this iteration is done, as if killed there (no extra checkpoint,
      no finalize, no marker): tests and drills.
  """
  stage_dir = pathlib.Path(stage_dir)
  writer = logging_utils.MetricWriter(stage_dir)
  restored = checkpointing.restore(manager, abstract={"params": state["params"],
                                                      "opt_state": state["opt_state"]},
                                   quarantine=True)
  start, loop_state = 0, {"best": -math.inf, "bad": 0, "stopped": False}
  if restored is None:
    writer.reset()
  else:
    extra = restored["extra"]
    start = int(extra["iteration"])
    state = {"params": restored["params"], "opt_state": restored["opt_state"],
             "step": jax.device_put(jnp.asarray(extra["state_step"], jnp.int32),
                                    state["step"].sharding)}
    data.set_state(extra["data"])
    loop_state.update(extra.get("loop", {}))
    writer.truncate(unit, start)
    logging.info("%s: resumed at %s %d", name, unit, start)
  indicator = None
  if progress:
    import tqdm  # pylint: disable=import-outside-toplevel
    indicator = tqdm.tqdm(total=total, initial=start, desc=name, unit=unit,
                          dynamic_ncols=True, leave=False)
  ckpt_every, log_every = max(int(ckpt_every), 1), max(int(log_every), 1)
  eval_every = int(eval_every) if evaluate is not None else 0

  saved_at = start

  def save(i, data_state, metrics=None):
    nonlocal saved_at
    saved_at = i
    checkpointing.save(manager, i, params=state["params"], opt_state=state["opt_state"],
                       extra={"iteration": i, "state_step": int(state["step"]),
                              "data": data_state, "loop": loop_state},
                       metrics=metrics)

  def run_eval(i) -> dict:
    t0 = time.perf_counter()
    m = {k: float(v) for k, v in evaluate(jax.device_get(state["params"]), i).items()}
    m["eval/seconds"] = time.perf_counter() - t0
    logging.info("%s %s %d: %s", name, unit, i, m)
    return m

  if eval_at_start and eval_every and start == 0:
    writer.write({unit: 0, **run_eval(0)}, 0)
    if on_eval is not None:
      on_eval(0)
  record: dict = {}
  i, completed, flag = start, bool(loop_state["stopped"]) or start >= total, _SignalFlag()
  t_window, n_window, items = time.perf_counter(), 0, 0.0
  data_state, preempt = None, False
  try:
    with flag.installed():
      batch = next(data) if not completed else None
      while not completed:
        state, metrics = step_fn(state, batch)
        if count_fn is not None:
          items += float(count_fn(batch))
        i += 1
        data_state = data.get_state()
        if i < total:                 # read the next batch while the device runs this one
          batch = next(data)
        n_window += 1
        if indicator is not None:
          indicator.update(1)
        evaluated = bool(eval_every) and (i % eval_every == 0 or i == total)
        if i % log_every == 0 or i == total or evaluated:
          m = _floats(metrics)
          loss = m.get("train/loss", 0.0)
          if not math.isfinite(loss):
            raise FloatingPointError(f"{name}: training loss is {loss} at {unit} {i} "
                                     "(lower the learning rate?)")
          dt = time.perf_counter() - t_window
          record = {unit: i, "step": i * steps_per_call, **m,
                    f"train/{unit}_time_s": dt / n_window}
          if rate_name:
            record[rate_name] = items / max(dt, 1e-9)
          eval_m = {}
          if evaluated:
            eval_m = run_eval(i)
            record.update(eval_m)
            if early_stopping is not None:
              value = eval_m[early_stopping.metric]
              if value > loop_state["best"]:
                loop_state["best"], loop_state["bad"] = value, 0
              else:
                loop_state["bad"] += 1
              loop_state["stopped"] = loop_state["bad"] >= early_stopping.patience
          writer.write(record, i * steps_per_call)
          if evaluated and on_eval is not None:
            on_eval(i)
          if indicator is not None:
            indicator.set_postfix(loss=f"{loss:.4f}")
          t_window, n_window, items = time.perf_counter(), 0, 0.0
        completed = i >= total or bool(loop_state["stopped"])
        preempt = _preemption_due(flag, i)
        if i % ckpt_every == 0 or completed or evaluated or preempt:
          save(i, data_state, metrics=eval_m if evaluated and early_stopping else None)
        if loop_state["stopped"]:
          logging.info("%s: early stop at %s %d", name, unit, i)
        if preempt or (stop_after is not None and i >= stop_after and not completed):
          break
    # Checked once the handlers are restored, so that a signal caught after the iteration's
    # check (during the last save, say) still ends the run as preempted.
    if preempt or flag.raised is not None:
      if saved_at != i:              # stop_after ended the loop between checkpoints
        save(i, data_state)
      err = Preempted(name, i, unit)
      logging.warning("%s", err.message)
      raise err
    if not completed:
      return LoopResult(state, i, False, record, None)
  finally:
    if indicator is not None:
      indicator.close()
    writer.close()
  final = None
  if finalize is not None:
    final = finalize(state)
  mark_finished(stage_dir, final if final is not None else {unit: i})
  return LoopResult(state, i, True, record, final)
