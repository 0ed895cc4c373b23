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
