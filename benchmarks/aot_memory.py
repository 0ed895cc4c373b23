r"""Ahead-of-time compile memory of an OPT decoder (default OPT-6.7B) on a simulated mesh.

No weights are created: parameters and inputs are abstract (jax.ShapeDtypeStruct with their
NamedSharding), the program is lowered and compiled for 8 fake CPU devices, and XLA's
memory analysis gives the per-device bytes (arguments = the parameter shard + inputs,
temporaries = activations / workspace). Two programs per mesh:
  forward:  logits at the last position (scoring, frozen-LLM inference);
  stage 2:  gradient w.r.t. the soft-prompt inputs_embeds of a next-token loss through the
            frozen LLM (the stage-2 backward; no parameter gradients), per-layer remat.

  python benchmarks/aot_memory.py --model=opt-6.7b --batch=8 --seq_len=512 \
      --meshes=1x1x1,8x1x1,1x8x1,1x1x8,2x2x2

Measured in float32: XLA:CPU has no native bf16 dot and inserts f32 copies of every bf16
weight (temporaries of a bf16 compile on CPU are inflated by ~4 bytes x parameters), which a
GPU does not do. The "bf16 est." column halves the f32 total (parameters, activations and
KV are all halved in bf16; the f32 softmax/logits parts are small at these shapes). CPU
compilation gives the sizes XLA plans for these shapes; GPU plans differ somewhat (fusion,
cuDNN workspaces), so treat the table as an estimate.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # pylint: disable=g-import-not-at-top
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from allmrec_jax import common_types as ct  # pylint: disable=g-import-not-at-top
from allmrec_jax import sharding as shd
from allmrec_jax.models.llm import OPTConfig, OPTDecoder
from allmrec_jax.weights import llm as llm_lib

SIZES = {  # hidden, layers, heads
    "opt-125m": (768, 12, 12), "opt-1.3b": (2048, 24, 32), "opt-2.7b": (2560, 32, 32),
    "opt-6.7b": (4096, 32, 32), "opt-13b": (5120, 40, 40),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "opt-6.7b", f"one of {sorted(SIZES)}")
flags.DEFINE_integer("batch", 8, "global batch (rows of the stage-2 batch)")
flags.DEFINE_integer("seq_len", 512, "prompt length in tokens")
flags.DEFINE_string("dtype", "float32", "parameter and compute dtype (see the docstring)")
flags.DEFINE_string("meshes", "1x1x1,8x1x1,1x8x1,1x1x8,2x2x2", "comma list of data x fsdp x tensor")
flags.DEFINE_string("programs", "forward,stage2", "which programs to compile")


def _mesh(shape):
  n = int(np.prod(shape))
  return Mesh(np.asarray(jax.devices()[:n]).reshape(shape), ct.MESH_AXES)


def _gib(x):
  return x / 2 ** 30


def measure(config: OPTConfig, mesh: Mesh, program: str, batch: int, seq_len: int):
  module = OPTDecoder(config)
  boxed = llm_lib.abstract_params(module, config)
  shardings = llm_lib.param_shardings(boxed, mesh, None)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(boxed), shardings)
  data = shd.fit_sharding(NamedSharding(mesh, P((ct.DATA, ct.FSDP))), (batch,))
  dtype = jnp.dtype(config.dtype)
  emb = jax.ShapeDtypeStruct((batch, seq_len, config.embed_dim), dtype,
                             sharding=NamedSharding(mesh, P(data.spec[0], None, None)))
  mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                              sharding=NamedSharding(mesh, P(data.spec[0], None)))
  target = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, P(data.spec[0])))

  def last_logits(p, e, m):
    _, aux = module.apply({"params": p}, inputs_embeds=e, attention_mask=m, compute_logits=False)
    return module.apply({"params": p}, aux["hidden"][:, -1], method="logits")

  def stage2_grad(p, e, m, y):
    def loss(e):
      logits = last_logits(p, e, m)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return jax.grad(loss)(e)

  with shd.activate(mesh):
    if program == "forward":
      lowered = jax.jit(last_logits).lower(params, emb, mask)
    else:
      lowered = jax.jit(stage2_grad).lower(params, emb, mask, target)
    t = time.time()
    compiled = lowered.compile()
    secs = time.time() - t
  ma = compiled.memory_analysis()
  args, out, temp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
  alias = getattr(ma, "alias_size_in_bytes", 0)
  return dict(args=_gib(args), out=_gib(out), temp=_gib(temp),
              total=_gib(args + out + temp - alias), compile_s=secs)


def main(argv):
  del argv
  hidden, layers, heads = SIZES[FLAGS.model]
  config = OPTConfig(vocab_size=50272, hidden_size=hidden, ffn_dim=4 * hidden, num_layers=layers,
                     num_heads=heads, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                     dtype=FLAGS.dtype, param_dtype=FLAGS.dtype, remat=True)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nn.unbox(llm_lib.abstract_params(OPTDecoder(config), config))))
  print(f"{FLAGS.model}: {n_params / 1e9:.2f} B parameters, {FLAGS.dtype}, batch {FLAGS.batch} "
        f"x {FLAGS.seq_len} tokens, per-layer remat; per-device GiB from XLA memory analysis")
  print("| mesh (data,fsdp,tensor) | program | params+inputs | outputs | temporaries | total | "
        "bf16 est. | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for m in FLAGS.meshes.split(","):
    shape = tuple(int(x) for x in m.split("x"))
    for program in FLAGS.programs.split(","):
      r = measure(config, _mesh(shape), program, FLAGS.batch, FLAGS.seq_len)
      print(f"| {shape} | {program} | {r['args']:.2f} | {r['out']:.2f} | {r['temp']:.2f} | "
            f"{r['total']:.2f} | {r['total'] / 2:.2f} | {r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
