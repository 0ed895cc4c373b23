"""benchmarks/profile_stage2.py: the HLO reader counts a jitted function's matmul FLOPs from
its compiled text, names each executed operation's part by its JAX call path, and the
trace reader attributes a real jax.profiler trace of that function to those parts."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import profile_stage2  # benchmarks/ is not a package: imported from its folder


class _Mlp(nn.Module):
  """Named like the decoder's MLP so the part rules apply: layers_0/mlp/{up,down}."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(48, use_bias=False, name="up")(x)
    return nn.Dense(16, use_bias=False, name="down")(jax.nn.silu(h))


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _Mlp(name="mlp")(nn.RMSNorm(name="mlp_norm")(x))


class LlamaDecoder(nn.Module):   # the call path reads jvp(LlamaDecoder)/layers_0/...

  @nn.compact
  def __call__(self, x):
    return _Block(name="layers_0")(x)


def test_flops_parts_and_trace(tmp_path):
  model = LlamaDecoder()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)

  @jax.jit
  def loss_grad(x):
    return jax.grad(lambda x: jnp.sum(model.apply(params, x) ** 2))(x)

  text = loss_grad.lower(x).compile().as_text()
  hlo = profile_stage2.parse_hlo(text)
  parts = {}
  for name, entry in hlo.items():
    part = profile_stage2.part_of(entry, name)
    parts.setdefault(part, 0.0)
    parts[part] += entry["flops"]
  proj = "projection matmuls (q k v o gate up down)"
  # Forward up and down, and their input gradients (no weight gradients: x is the
  # argument): 4 matmuls of 2 * 32 * 16 * 48 FLOPs each.
  assert parts[proj] == 4 * 2 * 32 * 16 * 48
  assert sum(parts.values()) == parts[proj]
  loss_grad(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    loss_grad(x).block_until_ready()
  result = profile_stage2.analyse(str(tmp_path), hlo, steps=1)
  assert result["parts"][proj]["n"] >= 1 and result["parts"][proj]["s"] > 0
  assert result["parts"][proj]["flops"] == parts[proj]
  assert set(result["parts"]) <= {p for p, _ in profile_stage2.PARTS}
  result["steps"] = 1
  table = profile_stage2.table(result)
  assert proj in table and "occupancy" in table
