r"""Ahead-of-time compile memory of an OPT decoder (default OPT-6.7B) on a simulated mesh.

No weights are created: parameters and inputs are abstract (jax.ShapeDtypeStruct with their
NamedSharding), the program is lowered and compiled for 8 fake CPU devices, and XLA's
memory analysis gives the per-device bytes (arguments = the parameter shard + inputs,
temporaries = activations / workspace). Programs (--programs):
  forward:      logits at the last position (scoring, frozen-LLM inference);
  stage2_grad:  gradient w.r.t. the soft-prompt inputs_embeds of a next-token loss through
                the frozen LLM (the stage-2 backward; no parameter gradients), per-layer
                remat ("stage2" is the same program);
  stage2_step:  the trainer's own stage-2 training step (trainers/stage2.py: `train_step`
                as `Stage2Trainer` binds it, `make_optimizer`'s Adam, the configs/base.py
                stage-2 defaults), jitted with the in/out shardings and state donation of
                trainers/steps.py `compile_step`: the projectors F_I, F_U (and with --lora
                the LLM's LoRA adapters) with their Adam moments as the donated state, the
                frozen LLM and the item table as the frozen tree, a paper-shaped prompt
                batch (10 history + 20 candidate item slots, targets of
                stage2.max_title_tokens + 1 tokens) over the mesh's data axes.

  python benchmarks/aot_memory.py --model=opt-6.7b --batch=8 --seq_len=512 \
      --meshes=1x1x1,8x1x1,1x8x1,1x1x8,2x2x2
  python benchmarks/aot_memory.py --model=opt-13b --batch=32 --seq_len=512 \
      --meshes=8x1x1,1x8x1,1x1x8,2x2x2 --programs=stage2_step [--lora] [--grad_accum=4]

Measured in float32: XLA:CPU has no native bf16 dot and inserts f32 copies of every bf16
weight (temporaries of a bf16 compile on CPU are inflated by ~4 bytes x parameters), which a
GPU does not do. The "bf16 est." column halves the f32 total (parameters, activations and
KV are all halved in bf16; the f32 softmax/logits parts are small at these shapes); for
stage2_step the trainable state (projectors and their Adam moments, float32 in the trainer
whatever the LLM's dtype) is kept whole: est. = (total - state) / 2 + state. CPU
compilation gives the sizes XLA plans for these shapes; GPU plans differ (fusion, cuDNN
workspaces, and the XLA:CPU schedule keeps every layer's recomputed activations alive: its
plan is the same with and without --remat), so treat the table as an upper-bound estimate
(benchmarks/aot_memory_stage2.md).
"""

from __future__ import annotations

import dataclasses
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
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from allmrec_jax import common_types as ct  # pylint: disable=g-import-not-at-top
from allmrec_jax import config_lib
from allmrec_jax import sharding as shd
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.models.llm import OPTConfig, OPTDecoder
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.weights import llm as llm_lib
from configs import base as base_config

# OPT shapes (the public configs; ffn = 4 x hidden) and a tiny one for tests.
MODELS = {
    "opt-125m": dict(hidden_size=768, num_layers=12, num_heads=12),
    "opt-1.3b": dict(hidden_size=2048, num_layers=24, num_heads=32),
    "opt-2.7b": dict(hidden_size=2560, num_layers=32, num_heads=32),
    "opt-6.7b": dict(hidden_size=4096, num_layers=32, num_heads=32),
    "opt-13b": dict(hidden_size=5120, num_layers=40, num_heads=40),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
                 max_position_embeddings=1024),
}
PROGRAMS = ("forward", "stage2_grad", "stage2", "stage2_step")
CF_DIM = 50      # x_u width: SASRec's hidden_dim (config.cf.hidden_dim)
LATENT = 128     # F_I's input width: the stage-1 joint embedding (config.stage1.latent_dim)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "opt-6.7b", f"one of {sorted(MODELS)}")
flags.DEFINE_integer("batch", 8, "global batch (rows of the stage-2 batch)")
flags.DEFINE_integer("seq_len", 512, "prompt length in tokens")
flags.DEFINE_string("dtype", "float32", "parameter and compute dtype (see the docstring)")
flags.DEFINE_string("meshes", "1x1x1,8x1x1,1x8x1,1x1x8,2x2x2", "comma list of data x fsdp x tensor")
flags.DEFINE_string("programs", "forward,stage2_grad", f"which programs to compile, of {PROGRAMS}")
flags.DEFINE_bool("lora", False, "stage2_step: also train the LLM's LoRA adapters "
                  "(config.llm.lora_rank / lora_alpha / lora_targets of configs/base.py)")
flags.DEFINE_string("lora_targets", "", "with --lora: comma list of OPT projections (q, k, v, "
                    "o, fc1, fc2; \"\" = configs/base.py's llm.lora_targets)")
flags.DEFINE_integer("num_items", 60000, "stage2_step: items in the frozen item table fed to "
                     "F_I (the paper's largest Amazon sets have ~60k)")
flags.DEFINE_integer("grad_accum", 1, "stage2_step: config.stage2.grad_accum (k > 1: --batch "
                     "is the micro-batch; Adam's state gains a gradient accumulator)")
flags.DEFINE_bool("remat", True, "rematerialise each decoder layer (config.llm.remat)")
flags.DEFINE_bool("header", True, "print the table's title and header lines")


def opt_config(model: str, dtype: str = "float32", remat: bool = True,
               lora_targets: tuple[str, ...] = ()) -> OPTConfig:
  """The OPTConfig of `model` (MODELS); LoRA rank/alpha from configs/base.py when
  `lora_targets` is not empty."""
  kw = {"vocab_size": 50272, "max_position_embeddings": 2048, **MODELS[model]}
  kw["ffn_dim"] = 4 * kw["hidden_size"]
  kw["word_embed_proj_dim"] = kw["hidden_size"]
  if lora_targets:
    llm_cfg = base_config.get_base_config().llm
    kw.update(lora_rank=int(llm_cfg.lora_rank), lora_alpha=float(llm_cfg.lora_alpha),
              lora_targets=tuple(lora_targets))
  return OPTConfig(dtype=dtype, param_dtype=dtype, remat=remat, **kw)


def make_mesh(shape) -> Mesh:
  n = int(np.prod(shape))
  return Mesh(np.asarray(jax.devices()[:n]).reshape(shape), ct.MESH_AXES)


def _gib(x):
  return x / 2 ** 30


def _abstract(shapes, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def device_bytes(tree) -> int:
  """Bytes of one device's shard of every leaf of an abstract (sharded) tree."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def llm_abstract(config: OPTConfig, mesh: Mesh, rules=None):
  """(module, {"params": abstract tree}) laid out as `weights.llm.load_params` places the
  loaded LLM (`param_shardings`: logical shardings, axes that do not divide dropped)."""
  module = OPTDecoder(config)
  boxed = llm_lib.abstract_params(module, config)
  return module, {"params": _abstract(nn.unbox(boxed),
                                      llm_lib.param_shardings(boxed, mesh, rules))}


@dataclasses.dataclass
class Stage2Program:
  """The stage-2 training step's jitted function and abstract arguments."""
  jitted: object            # jax.jit(train_step) with compile_step's shardings
  args: tuple               # (state, frozen, batch, rng), abstract
  state_bytes: int          # per device: trainable params + optimizer state + step
  trainable_params: int     # number of trainable parameters


def stage2_state(trainer: stage2_lib.Stage2Trainer, trainable, mesh: Mesh, rules=None):
  """The abstract {"params", "opt_state", "step"} of `trainer.init_state(trainable)` (a
  boxed or plain abstract tree): the same shardings (trainable leaves by their logical axes,
  dropped where they do not divide; Adam's moments like their parameters; the rest
  replicated) without creating the arrays."""
  rep = shd.replicated(mesh)
  shapes = nn.unbox(trainable)
  p_sh = jax.tree.map(lambda s, a: shd.fit_sharding(s, a.shape),
                      shd.logical_shardings(trainable, mesh, rules), shapes)
  params = _abstract(shapes, p_sh)
  opt_shapes = jax.eval_shape(trainer.optimizer.init, params)
  opt_sh = optax.tree_map_params(trainer.optimizer, lambda _, s: s, opt_shapes, p_sh,
                                 transform_non_params=lambda _: rep)
  return {"params": params, "opt_state": _abstract(opt_shapes, opt_sh),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}


def stage2_batch(mesh: Mesh, cfg: config_lib.Stage2Config, batch: int, seq_len: int):
  """The abstract arrays of one `stage2.iterate_batches` batch (PromptBatch fields +
  user_rep, cand_items, target_item), placed as `Stage2Trainer.put_batch` places them."""
  s = cfg.num_history + cfg.num_candidates
  tt = cfg.max_title_tokens + 1
  i32, f32 = jnp.int32, jnp.float32
  shapes = {"input_ids": ((batch, seq_len), i32), "attention_mask": ((batch, seq_len), i32),
            "user_pos": ((batch, 1), i32), "item_pos": ((batch, s), i32),
            "item_ids": ((batch, s), i32), "target_pos": ((batch, tt), i32),
            "target_ids": ((batch, tt), i32), "target_mask": ((batch, tt), f32),
            "prompt_len": ((batch,), i32), "user_rep": ((batch, CF_DIM), f32),
            "cand_items": ((batch, cfg.num_candidates), i32), "target_item": ((batch,), i32)}
  shards = mesh.shape[ct.DATA] * mesh.shape[ct.FSDP]
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=(
      shd.batch_sharding(mesh, len(shape)) if batch % shards == 0 else shd.replicated(mesh)))
          for k, (shape, dtype) in shapes.items()}


def stage2_program(config: OPTConfig, mesh: Mesh, batch: int, seq_len: int, *,
                   lora: bool = False, num_items: int = 60000, optimizer=None,
                   grad_accum: int = 1, rules=None) -> Stage2Program:
  """The stage-2 training step as `Stage2Trainer.step` compiles it, on abstract arguments.

  Args:
    config: the frozen LLM (with lora_rank / lora_targets when `lora`).
    lora: train the LLM's LoRA adapters beside the projectors (config.stage2.train_lora).
    optimizer: None = `stage2.make_optimizer` of the configs/base.py stage-2 section.
    grad_accum: that section's grad_accum (k > 1: optax.MultiSteps, whose accumulator is
      one more copy of the trainable tree in the state).
  """
  base = base_config.get_base_config()
  base.stage2.grad_accum = int(grad_accum)
  cfg = config_lib.Stage2Config.from_config(base)
  llm, llm_params = llm_abstract(config, mesh, rules)
  projectors = projectors_lib.Stage2Projectors(LATENT, CF_DIM, config.embed_dim)
  trainer = stage2_lib.Stage2Trainer(
      llm=llm, llm_params=llm_params, projectors=projectors,
      item_table=np.zeros((1, LATENT), np.float32),   # placeholder; the frozen one below
      optimizer=optimizer or stage2_lib.make_optimizer(cfg), mesh=mesh, rules=rules,
      **stage2_lib.match_options(cfg))
  rng = jax.random.PRNGKey(0)
  trainable = jax.eval_shape(
      lambda: stage2_lib.init_projectors(projectors, rng, LATENT, CF_DIM))
  if lora:
    trainable["lora"] = jax.eval_shape(
        lambda p: lora_lib.init_adapters(llm, p, rng), llm_params)
  state = stage2_state(trainer, trainable, mesh, rules)
  frozen = {"llm": llm_params,
            "items": jax.ShapeDtypeStruct((num_items + 1, LATENT), jnp.float32,
                                          sharding=shd.replicated(mesh))}
  rep = shd.replicated(mesh)
  key = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep)
  # trainers/steps.py compile_step, with the shardings read off the abstract trees.
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  step_fn = trainer._step_fn  # pylint: disable=protected-access  # the trainer's bound step
  jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, None, None),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  return Stage2Program(jitted, (state, frozen, stage2_batch(mesh, cfg, batch, seq_len), key),
                       device_bytes(state), n)


def measure(config: OPTConfig, mesh: Mesh, program: str, batch: int, seq_len: int, *,
            lora: bool = False, num_items: int = 60000, optimizer=None,
            grad_accum: int = 1) -> dict:
  """Compiles `program` (PROGRAMS) on `mesh`; per-device sizes from XLA's memory analysis.

  Returns:
    {"args", "out", "temp", "total", "state" (GiB per device; state = the trainable
    params + optimizer state among the arguments, 0 outside stage2_step), "args_bytes",
    "state_bytes", "trainable_params", "compile_s"}.
  """
  if program not in PROGRAMS:
    raise ValueError(f"--programs: unknown program {program!r}; known: {PROGRAMS}")
  state_bytes, n_trainable = 0, 0
  if program == "stage2_step":
    prog = stage2_program(config, mesh, batch, seq_len, lora=lora, num_items=num_items,
                          optimizer=optimizer, grad_accum=grad_accum)
    state_bytes, n_trainable = prog.state_bytes, prog.trainable_params
  else:
    module, llm_vars = llm_abstract(config, mesh)
    params = llm_vars["params"]
    data = shd.fit_sharding(NamedSharding(mesh, P((ct.DATA, ct.FSDP))), (batch,))
    dtype = jnp.dtype(config.dtype)
    emb = jax.ShapeDtypeStruct((batch, seq_len, config.embed_dim), dtype,
                               sharding=NamedSharding(mesh, P(data.spec[0], None, None)))
    mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                                sharding=NamedSharding(mesh, P(data.spec[0], None)))
    target = jax.ShapeDtypeStruct((batch,), jnp.int32,
                                  sharding=NamedSharding(mesh, P(data.spec[0])))

  def last_logits(p, e, m):
    _, aux = module.apply({"params": p}, inputs_embeds=e, attention_mask=m, compute_logits=False)
    return module.apply({"params": p}, aux["hidden"][:, -1], method="logits")

  def stage2_grad(p, e, m, y):
    def loss(e):
      logits = last_logits(p, e, m)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return jax.grad(loss)(e)

  with shd.activate(mesh):
    if program == "stage2_step":
      lowered = prog.jitted.lower(*prog.args)
    elif program == "forward":
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
              total=_gib(args + out + temp - alias), state=_gib(state_bytes),
              args_bytes=int(args), state_bytes=int(state_bytes),
              trainable_params=n_trainable, compile_s=secs)


def bf16_estimate(r: dict) -> float:
  """GiB per device in bfloat16: the f32 total halved, the f32 trainable state kept."""
  return (r["total"] - r["state"]) / 2 + r["state"]


def main(argv):
  del argv
  lora = FLAGS.lora
  targets = ()
  if lora:
    targets = lora_lib.parse_targets(FLAGS.lora_targets
                                     or base_config.get_base_config().llm.lora_targets, "opt")
  config = opt_config(FLAGS.model, FLAGS.dtype, remat=FLAGS.remat, lora_targets=targets)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nn.unbox(llm_lib.abstract_params(OPTDecoder(config), config))))
  if FLAGS.header:
    remat = "per-layer remat" if FLAGS.remat else "no remat"
    extra = f", LoRA on {','.join(targets)} trained" if lora else ""
    if FLAGS.grad_accum > 1:
      extra += f", gradient accumulation over {FLAGS.grad_accum} micro-batches"
    print(f"{FLAGS.model}: {n_params / 1e9:.2f} B parameters, {FLAGS.dtype}, batch {FLAGS.batch} "
          f"x {FLAGS.seq_len} tokens, {remat}{extra}; per-device GiB from XLA memory analysis")
    print("| mesh (data,fsdp,tensor) | program | params+inputs | of which trainable+Adam | "
          "outputs | temporaries | total | bf16 est. | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
  for m in FLAGS.meshes.split(","):
    shape = tuple(int(x) for x in m.split("x"))
    for program in FLAGS.programs.split(","):
      r = measure(config, make_mesh(shape), program, FLAGS.batch, FLAGS.seq_len, lora=lora,
                  num_items=FLAGS.num_items, grad_accum=FLAGS.grad_accum)
      print(f"| {shape} | {program} | {r['args']:.2f} | {r['state']:.2f} | {r['out']:.2f} | "
            f"{r['temp']:.2f} | {r['total']:.2f} | {bf16_estimate(r):.2f} | "
            f"{r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
