"""Orbax checkpoint wrapper: round trip, latest + best retention, sharded restore."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from allmrec_jax import checkpointing
from allmrec_jax import sharding


def _tree(v):
  return {"a": jnp.full((4,), v, jnp.float32), "b": {"c": jnp.arange(6.0).reshape(2, 3) + v}}


def test_save_restore_latest_and_best(tmp_path):
  mngr = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=1, best_metric="valid/m")
  tx = optax.adam(1e-3)
  for step, metric in [(1, 0.3), (2, 0.9), (3, 0.5), (4, 0.1)]:
    p = _tree(float(step))
    checkpointing.save(mngr, step, params=p, opt_state=tx.init(p),
                       extra={"epoch": step, "iter": {"pos": np.int64(step * 8)}},
                       metrics={"valid/m": metric})
  assert sorted(mngr.all_steps()) == [2, 4]           # best (0.9) + latest
  assert checkpointing.best_step(mngr) == 2 and checkpointing.latest_step(mngr) == 4
  like = _tree(0.0)
  r = checkpointing.restore(mngr, abstract={"params": like, "opt_state": tx.init(like)})
  assert r["step"] == 4 and r["extra"]["epoch"] == 4 and r["extra"]["iter"]["pos"] == 32
  assert r["extra"]["metrics"] == {"valid/m": pytest.approx(0.1)}
  np.testing.assert_array_equal(r["params"]["a"], 4.0)
  assert isinstance(r["opt_state"], type(tx.init(like)))
  best = checkpointing.restore(mngr, step=checkpointing.best_step(mngr),
                               abstract={"params": like})
  np.testing.assert_array_equal(best["params"]["b"]["c"], np.arange(6.0).reshape(2, 3) + 2)
  # A fresh manager on the same directory sees the same steps (resume after restart).
  again = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=1, best_metric="valid/m")
  assert again.best_step() == 2 and again.latest_step() == 4


def test_empty_and_errors(tmp_path):
  mngr = checkpointing.make_manager(tmp_path / "none", max_to_keep=2)
  assert checkpointing.restore(mngr) is None
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpointing.make_manager(tmp_path / "x", max_to_keep=0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_restore_sharded(tmp_path):
  mesh = sharding.make_mesh((8, 1, 1))
  s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  p = {"w": jax.device_put(jnp.arange(16.0), s)}
  mngr = checkpointing.make_manager(tmp_path / "ckpt")
  checkpointing.save(mngr, 0, params=p, extra={})
  like = {"w": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=s)}
  r = checkpointing.restore(mngr, abstract={"params": like})
  assert sharding.num_shards(r["params"]["w"]) == 8
  np.testing.assert_array_equal(r["params"]["w"], np.arange(16.0))


def _zero_files(folder):
  for p in folder.rglob("*"):
    if p.is_file():
      p.write_bytes(b"\0" * max(p.stat().st_size, 1))


@pytest.mark.parametrize("damage", ["zeroed_params", "no_params", "bad_extra"])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage):
  """Two kept steps: a damaged latest one is skipped (warning naming its folder), the
  previous one restored; quarantine moves it aside so that the step can be saved again;
  asking for the damaged step explicitly raises an error naming its folder."""
  mngr = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=2)
  for step in (1, 2):
    checkpointing.save(mngr, step, params=_tree(float(step)), extra={"epoch": step})
  step_dir = tmp_path / "ckpt" / "2"
  if damage == "zeroed_params":
    _zero_files(step_dir / "params")
  elif damage == "no_params":
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(step_dir / "params")
  else:
    for p in (step_dir / "extra").rglob("*"):
      if p.is_file():
        p.write_text("{not json")
  fresh = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=2)
  with pytest.raises(checkpointing.CheckpointError, match=str(step_dir)):
    checkpointing.restore(fresh, step=2, abstract={"params": _tree(0.0)})
  r = checkpointing.restore(fresh, abstract={"params": _tree(0.0)}, quarantine=True)
  assert r["step"] == 1 and r["extra"] == {"epoch": 1}
  np.testing.assert_array_equal(r["params"]["a"], 1.0)
  assert not step_dir.exists() and (tmp_path / "ckpt_damaged" / "2").is_dir()
  assert fresh.all_steps() == [1]
  checkpointing.save(fresh, 2, params=_tree(5.0), extra={"epoch": 2})
  np.testing.assert_array_equal(checkpointing.restore(fresh)["params"]["a"], 5.0)


def test_no_readable_step_is_an_error(tmp_path):
  mngr = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=2)
  checkpointing.save(mngr, 3, params=_tree(3.0), extra={})
  _zero_files(tmp_path / "ckpt" / "3" / "params")
  with pytest.raises(checkpointing.CheckpointError, match="no readable checkpoint.*ckpt/3"):
    checkpointing.restore(checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=2),
                          abstract={"params": _tree(0.0)})
