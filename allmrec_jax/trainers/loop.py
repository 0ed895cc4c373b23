"""What the training loops of every stage share: the finished marker, the checkpoint
cadence, the progress indicator and the metric writer.

  loop = TrainLoop(stage_dir, name="stage1", total=1000, initial=restored_step,
                   ckpt_every=100, manager=manager, truncate_key="step")
  for ...:
    state, metrics = train_step(state, frozen, batch, rng)
    loop.advance()
    if loop.log_due(step): loop.log(step, {...}, postfix={"loss": ...})
    if loop.ckpt_due(step, end_of_epoch): loop.save(step, params=..., opt_state=..., extra=...)
  loop.close()
  mark_finished(stage_dir, {"steps": step})

Every stage folder (`cf/`, `stage1/`, `stage2/`, and the variants' `stage2_*/`) holds a
`FINISHED` file (a JSON record) once its training is complete; a rerun that finds it
restores the result instead of training.
"""

from __future__ import annotations

import json
import pathlib

from allmrec_jax import checkpointing
from allmrec_jax import logging_utils

MARKER = "FINISHED"


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
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    (pathlib.Path(stage_dir) / MARKER).write_text(json.dumps(record) + "\n")


class TrainLoop:
  """Progress, metric writing (`logging_utils.MetricWriter`: metrics.jsonl + TensorBoard)
  and checkpoint cadence of one stage's loop over steps (or epochs).

  Args:
    stage_dir: the stage's folder.
    name: the progress indicator's label.
    total, initial: the loop's length and where a resumed run starts.
    ckpt_every: steps between checkpoints (the last step and `force` always save).
    manager: the orbax CheckpointManager (`checkpointing.make_manager`).
    log_every: steps between metric records (the last step always logs).
    truncate_key: metrics.jsonl rows past `initial` under this key ("step", "epoch") are
      dropped: what an interrupted run logged after its last checkpoint is logged again.
    progress: False = no progress indicator.
    unit: the progress indicator's unit.
  """

  def __init__(self, stage_dir, *, name: str, total: int, initial: int, ckpt_every: int,
               manager, log_every: int = 1, truncate_key: str = "step",
               progress: bool = True, unit: str = "step"):
    self.total, self.ckpt_every = int(total), max(int(ckpt_every), 1)
    self.log_every, self.manager = max(int(log_every), 1), manager
    self.writer = logging_utils.MetricWriter(pathlib.Path(stage_dir))
    self.writer.truncate(truncate_key, int(initial))
    self._indicator = None
    if progress:
      import tqdm  # pylint: disable=import-outside-toplevel
      self._indicator = tqdm.tqdm(total=self.total, initial=int(initial), desc=name,
                                  unit=unit, dynamic_ncols=True, leave=False)

  @property
  def path(self) -> pathlib.Path:
    return self.writer.path

  def advance(self, n: int = 1) -> None:
    if self._indicator is not None:
      self._indicator.update(n)

  def log_due(self, step: int) -> bool:
    return step % self.log_every == 0 or step >= self.total

  def ckpt_due(self, step: int, force: bool = False) -> bool:
    return force or step % self.ckpt_every == 0 or step >= self.total

  def log(self, step: int, record: dict, postfix: dict | None = None) -> None:
    self.writer.write(record, step)
    if postfix and self._indicator is not None:
      self._indicator.set_postfix(**postfix)

  def save(self, step: int, **items) -> None:
    checkpointing.save(self.manager, step, **items)

  def close(self) -> None:
    if self._indicator is not None:
      self._indicator.close()
    self.writer.close()
