"""sharding.put_batch on 8 fake devices: rows split over (data, fsdp) when they divide,
replicated (and reported) when not, nested dicts handled alike."""

import jax
import numpy as np
import pytest

from allmrec_jax import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def test_put_batch_splits_or_replicates():
  mesh = sharding.make_mesh((2, 4, 1))
  seen = set()
  out = sharding.put_batch(mesh, {"a": np.arange(16).reshape(8, 2),
                                  "b": np.arange(3),
                                  "nested": {"c": np.ones((16, 3), np.float32)}},
                           process_local=False, replicated_out=seen)
  assert sharding.num_shards(out["a"]) == 8 and sharding.num_shards(out["nested"]["c"]) == 8
  assert sharding.num_shards(out["b"]) == 1
  assert seen == {("b", (3,))}
  np.testing.assert_array_equal(np.asarray(out["a"]), np.arange(16).reshape(8, 2))
  np.testing.assert_array_equal(np.asarray(out["b"]), np.arange(3))


def test_make_mesh_shapes():
  """-1 takes the remaining devices; an explicit shape may use the first few devices of
  one process; more devices than exist, or a -1 that does not divide them, is an error."""
  assert sharding.make_mesh((-1, 2, 1)).devices.shape == (4, 2, 1)
  one = sharding.make_mesh((1, 1, 1))
  assert one.devices.shape == (1, 1, 1) and one.devices.flat[0] == jax.devices()[0]
  assert sorted(d.id for d in sharding.make_mesh((2, 1, 2)).devices.flat) == [
      d.id for d in jax.devices()[:4]]
  with pytest.raises(ValueError, match=r"mesh shape \(16, 1, 1\) needs 16 devices, 8 "):
    sharding.make_mesh((16, 1, 1))
  with pytest.raises(ValueError, match=r"mesh shape \(3, 2, 1\) needs 6 devices, 8 "):
    sharding.make_mesh((3, -1, 1))
