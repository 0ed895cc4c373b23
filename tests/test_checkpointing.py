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
