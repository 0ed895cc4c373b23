"""The training loop under SIGTERM: wherever the signal lands while the loop's handler is
installed, the run saves a checkpoint at the step reached and ends as preempted, and the
rerun resumes from it without repeating a step."""

import os
import signal

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from allmrec_jax import checkpointing
from allmrec_jax.trainers import loop as loop_lib

TOTAL = 4


def _run(stage_dir, calls: list, ckpt_every: int = 100):
  tx = optax.sgd(0.1)
  params = {"w": jnp.zeros((3,), jnp.float32)}
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def step_fn(s, batch):
    calls.append(int(batch[0]))
    grads = {"w": s["params"]["w"] - jnp.asarray(batch, jnp.float32)}
    updates, opt_state = tx.update(grads, s["opt_state"])
    return ({"params": optax.apply_updates(s["params"], updates), "opt_state": opt_state,
             "step": s["step"] + 1}, {"train/loss": jnp.sum(grads["w"] ** 2)})

  data = loop_lib.EpochBatches(
      lambda epoch, start: ([float(epoch * 2 + b)] * 3 for b in range(start, 2)), 2)
  manager = checkpointing.make_manager(stage_dir / "ckpt")
  try:
    return loop_lib.run(stage_dir, name="toy", state=state, step_fn=step_fn, data=data,
                        total=TOTAL, manager=manager, progress=False,
                        ckpt_every=ckpt_every, finalize=lambda s: {"w": float(s["params"]["w"][0])})
  finally:
    manager.close()


def _reference(tmp_path):
  calls: list = []
  return _run(tmp_path / "ref", calls), calls


@pytest.mark.parametrize("signal_at,preempted_at", [(2, 3), (TOTAL, TOTAL)])
def test_sigterm_during_a_save_ends_the_run_as_preempted(tmp_path, monkeypatch, signal_at,
                                                         preempted_at):
  """The signal arrives inside the save of step `signal_at`, after the loop looked for it:
  mid-run, the next step's check finds it; in the last step's save, the loop's end does.
  Either way: Preempted at `preempted_at` with its checkpoint, no FINISHED marker, the
  handler put back; the rerun trains only the remaining steps and ends with the uninterrupted
  run's parameters and final record."""
  ref, ref_calls = _reference(tmp_path)
  real_save = checkpointing.save

  def save_then_signal(manager, step, **kw):
    real_save(manager, step, **kw)
    if step == signal_at:
      os.kill(os.getpid(), signal.SIGTERM)

  stage, calls, handler = tmp_path / "run", [], signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as m:
    m.setattr(checkpointing, "save", save_then_signal)
    with pytest.raises(loop_lib.Preempted) as e:
      _run(stage, calls, ckpt_every=1)
  assert e.value.code == loop_lib.EXIT_PREEMPTED and e.value.step == preempted_at
  assert signal.getsignal(signal.SIGTERM) is handler
  assert loop_lib.finished(stage) is None
  assert calls == ref_calls[:preempted_at]
  resumed = _run(stage, calls)
  assert resumed.completed and calls == ref_calls
  assert resumed.final == ref.final and loop_lib.finished(stage) == ref.final
  np.testing.assert_array_equal(np.asarray(resumed.state["params"]["w"]),
                                np.asarray(ref.state["params"]["w"]))
