"""Device mesh, logical-axis rules, and sharded creation of parameter trees.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
`logical_axis_rules` maps those names onto the ("data", "fsdp", "tensor") mesh. The same
code runs on one CPU, on 8 fake CPU devices (tests), on a GPU and on a multi-host pod.

Typical use (MaxText-style):
  mesh = make_mesh(config.mesh)
  rules = axis_rules(config.mesh)
  abstract = jax.eval_shape(init_fn, rng)                # boxed, no memory
  shardings = logical_shardings(abstract, mesh, rules)   # NamedSharding tree
  params = jax.jit(init_fn, out_shardings=shardings)(rng)
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import math
from typing import Any
from collections.abc import Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from allmrec_jax import common_types as ct

# Paper-agnostic default: FSDP over the width, tensor parallel over heads/mlp/vocab,
# batch over data x fsdp. Small recommender tables are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (ct.VOCAB, ct.TENSOR),
    (ct.EMBED, ct.FSDP),
    (ct.MLP, ct.TENSOR),
    (ct.HEADS, ct.TENSOR),
    (ct.KV, None),
    (ct.ITEMS, None),
    (ct.LATENT, None),
    (ct.NORM, None),
    (ct.ACT_BATCH, (ct.DATA, ct.FSDP)),
    (ct.ACT_LEN, None),
    (ct.ACT_EMBED, None),
    (ct.ACT_HEADS, ct.TENSOR),
    (ct.ACT_VOCAB, ct.TENSOR),
)


def make_mesh(shape: Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh.

  Args:
    shape: sizes of (data, fsdp, tensor); -1 in one place takes the remaining devices.
      None = all devices on "data".
    devices: defaults to `jax.devices()` (all processes' devices on a pod). In a single
      process an explicit shape may use fewer of them (the first ones, e.g. (1, 1, 1) for
      one device); across processes it must use them all.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if shape is None:
    shape = (n, 1, 1)
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  explicit = -1 not in shape
  if not explicit:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = n // known
  need = math.prod(shape)
  if explicit and 0 < need < n and jax.process_count() == 1:
    devices, n = devices[:need], need
  if need != n:
    raise ValueError(f"mesh shape {tuple(shape)} needs {need} devices, "
                     f"{len(devices)} available (set --config.mesh.shape)")
  try:
    dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  # fake CPU devices, odd topologies
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, ct.MESH_AXES)


def axis_rules(rules: Sequence[Sequence[Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """Logical-axis rules as a tuple of (name, mesh axes) pairs."""
  if rules is None:
    return DEFAULT_RULES
  return tuple((str(r[0]), (tuple(r[1]) if isinstance(r[1], list) else r[1])) for r in rules)


def logical_specs(tree: Any) -> Any:
  """PartitionSpec tree of logical names from a boxed (nn.Partitioned) tree."""
  return nn.get_partition_spec(tree)


def logical_shardings(tree: Any, mesh: Mesh, rules=None) -> Any:
  """NamedSharding tree for a (possibly abstract) boxed parameter tree."""
  specs = logical_specs(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P((ct.DATA, ct.FSDP), *([None] * (ndim - 1))))


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules=None, *args) -> tuple[Any, Any]:
  """Creates parameters already sharded: eval_shape -> shardings -> jit(out_shardings).

  Returns:
    (unboxed params, NamedSharding tree)
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  with mesh, nn.logical_axis_rules(axis_rules(rules)):
    boxed = jax.jit(init_fn, out_shardings=shardings)(*args)
  return nn.unbox(boxed), shardings


def unboxed_shardings(boxed_abstract: Any, mesh: Mesh, rules=None) -> Any:
  """Shardings of a boxed abstract tree, laid out like its unboxed values."""
  return logical_shardings(boxed_abstract, mesh, rules)


def shard_like(tree: Any, shardings: Any) -> Any:
  """device_put each leaf with its sharding (host arrays -> sharded device arrays)."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=None):
  """`with activate(mesh, rules):` enables logical constraints inside jitted code."""
  with mesh, nn.logical_axis_rules(axis_rules(rules)):
    yield


def num_shards(x: jax.Array) -> int:
  """How many distinct shards an array is split into (1 = replicated)."""
  return len({tuple((s.start, s.stop) for s in idx)
              for idx in x.sharding.devices_indices_map(x.shape).values()})


def fit_sharding(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """Drops mesh axes from the dimensions they do not divide (e.g. 9 heads on 2 devices)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for d, axes in enumerate(spec):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    if shape[d] % math.prod(sharding.mesh.shape[a] for a in names):
      spec[d] = None
  return NamedSharding(sharding.mesh, P(*spec))


def put_batch(mesh: Mesh, arrays: dict[str, Any], *, process_local: bool,
              replicated_out: set | None = None) -> dict[str, jax.Array]:
  """Host batch arrays -> global arrays with the leading axis over (data, fsdp).

  process_local=True: each process passes its own rows (its slice of every global batch,
  as stage 2's `iterate_batches(shard=...)` builds them); False: every process passes the
  whole global batch (stage 1's grain iterator), and keeps its slice. An array whose global
  rows do not divide the data shards is replicated (every process must then pass the
  same rows); its (name, shape) is added to `replicated_out` so the caller can warn once.
  """
  shards = mesh.shape[ct.DATA] * mesh.shape[ct.FSDP]
  pi, pc = jax.process_index(), jax.process_count()
  out = {}
  for k, v in arrays.items():
    if isinstance(v, dict):     # nested arrays (stage 1's packed texts): the same rule each
      out[k] = put_batch(mesh, v, process_local=process_local, replicated_out=replicated_out)
      continue
    v = np.asarray(v)
    rows = v.shape[0] * (pc if process_local else 1)
    if rows % shards:
      if replicated_out is not None:
        replicated_out.add((k, v.shape))
      out[k] = jax.device_put(v, replicated(mesh))
      continue
    s = batch_sharding(mesh, v.ndim)
    if pc == 1:
      out[k] = jax.device_put(v, s)
      continue
    if not process_local:
      per = rows // pc
      v = v[pi * per:(pi + 1) * per]
    out[k] = jax.make_array_from_process_local_data(s, v)
  return out
