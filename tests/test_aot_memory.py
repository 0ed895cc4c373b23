"""benchmarks/aot_memory.py's stage2_step program on the tiny OPT and 8 fake devices: the
trainer's step compiles on abstract arguments, its argument bytes hold the trainable state
with Adam's two moments, and that state is laid out as `Stage2Trainer.init_state` lays it."""

import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import aot_memory  # benchmarks/ is not a package: imported from its folder

from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models.llm import OPTDecoder
from allmrec_jax.trainers import stage2 as stage2_lib

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

MESH = (2, 2, 2)         # every mesh axis > 1: the LoRA adapters split over fsdp and tensor


def _config():
  """The tiny OPT with one layer (the compiles are most of the test's time)."""
  return dataclasses.replace(aot_memory.opt_config("tiny", lora_targets=("q", "v")),
                             num_layers=1)


def test_stage2_step_arguments_hold_adam_state():
  config, mesh = _config(), aot_memory.make_mesh((1, 1, 8))   # the quickest to compile
  kw = dict(lora=True, num_items=100)
  adam = aot_memory.measure(config, mesh, "stage2_step", 8, 32, **kw)
  sgd = aot_memory.measure(config, mesh, "stage2_step", 8, 32, optimizer=optax.sgd(1e-3), **kw)
  prog = aot_memory.stage2_program(config, mesh, 8, 32, **kw)
  param_bytes = aot_memory.device_bytes(prog.args[0]["params"])
  assert adam["trainable_params"] > 0 and param_bytes > 0
  assert adam["args_bytes"] > adam["state_bytes"] == prog.state_bytes > 0
  assert adam["total"] > 0 and adam["compile_s"] > 0
  # Adam adds mu and nu (each laid out like the params) and its int32 count.
  assert adam["state_bytes"] - sgd["state_bytes"] == 2 * param_bytes + 4
  grown = adam["args_bytes"] - sgd["args_bytes"]
  assert 2 * param_bytes <= grown <= 2 * param_bytes + 1024, (grown, param_bytes)


def test_abstract_state_matches_trainer_init_state():
  """The abstract state has the shapes, dtypes and shardings of the real one."""
  config, mesh = _config(), aot_memory.make_mesh(MESH)
  llm = OPTDecoder(config)
  projectors = aot_memory.projectors_lib.Stage2Projectors(aot_memory.LATENT, aot_memory.CF_DIM,
                                                          config.embed_dim)

  @jax.jit
  def init(rng):     # jitted: the same values as eagerly, in a fraction of the time
    llm_params = {"params": nn.unbox(llm.init(rng, input_ids=jnp.zeros((1, 1), jnp.int32))
                                     ["params"])}
    trainable = stage2_lib.init_projectors(projectors, rng, aot_memory.LATENT,
                                           aot_memory.CF_DIM)
    trainable["lora"] = lora_lib.init_adapters(llm, llm_params, rng)
    return llm_params, trainable

  llm_params, trainable = init(jax.random.PRNGKey(0))
  trainer = stage2_lib.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=projectors,
                                     item_table=np.zeros((3, aot_memory.LATENT), np.float32),
                                     optimizer=optax.adam(1e-3), mesh=mesh)
  real = trainer.init_state(trainable)
  abstract = aot_memory.stage2_state(trainer, jax.eval_shape(lambda: trainable), mesh)
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  sharded = 0
  for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
    assert (r.shape, r.dtype) == (a.shape, a.dtype)
    assert r.sharding.is_equivalent_to(a.sharding, r.ndim), (r.sharding, a.sharding)
    sharded += r.sharding.shard_shape(r.shape) != r.shape
  assert sharded > 0        # the LoRA adapters and their moments are split over the mesh
