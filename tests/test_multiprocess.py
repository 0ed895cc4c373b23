"""Two processes on this machine (jax.distributed over localhost, gloo CPU collectives): a
stage-2 step whose global batch is built from each process's half (the trainer's
`iterate_batches(shard=(process, 2))` + `put_batch`) equals the same step run by one
process on the whole batch (loss and updated projectors)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from allmrec_jax import testing

STEPS = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_steps(process: int, count: int) -> dict:
  """STEPS stage-2 steps of batch 4 on a tiny Llama; this process builds its 4 / count rows.
  Returns the losses and a checksum of the trained projectors."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from allmrec_jax import assets  # pylint: disable=import-outside-toplevel
  from allmrec_jax import sharding  # pylint: disable=import-outside-toplevel
  from allmrec_jax.data import pipelines, prepare  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models import projectors as projectors_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models.llm import LlamaConfig, LlamaDecoder  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2, stage2_run  # pylint: disable=import-outside-toplevel
  from configs import ml100k  # pylint: disable=import-outside-toplevel
  c = ml100k.get_config()
  c.stage2.num_candidates, c.stage2.num_history = 5, 3
  c.stage2.len_bucket = 512     # one prompt length: one compiled step per process
  ds = prepare.prepare_dataset(c.data)
  gguf = assets.get_asset("smollm2-135m")
  tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  llm = LlamaDecoder(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                 num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                 tie_word_embeddings=True))
  mesh = sharding.make_mesh((count, 1, 1), jax.devices()[:count])
  rep = sharding.replicated(mesh)
  llm_params = jax.device_put(nn.unbox(llm.init(jax.random.PRNGKey(0),
                                                input_ids=jnp.zeros((1, 4), jnp.int32))), rep)
  builder = stage2_run.prompt_builder(ds, tok, c.stage2)
  table = np.random.default_rng(0).uniform(size=(ds.num_items + 1, 8)).astype(np.float32)
  ex = stage2.training_examples(ds, maxlen=c.data.maxlen, num_history=3)
  user_rep = (ex.seq[:, -4:] % 7).astype(np.float32)
  proj = projectors_lib.Stage2Projectors(8, 4, 16)
  trainer = stage2.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj,
                                 item_table=table, optimizer=stage2.make_optimizer(c.stage2),
                                 mesh=mesh)
  state = trainer.init_state(stage2.init_projectors(proj, jax.random.PRNGKey(0), 8, 4))
  losses = []
  batches = stage2.iterate_batches(ex, user_rep, builder, ds,
                                   pipelines.train_exclusion_index(ds), batch_size=4,
                                   num_candidates=5, seed=0, epoch=0,
                                   shard=(process, count))
  for _, arrays in batches:
    state, m = trainer.step(state, arrays)
    losses.append(float(jax.device_get(m["train/loss"])))
    if len(losses) == STEPS:
      break
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state["params"])
  return {"losses": losses,
          "checksum": float(sum(np.abs(x).sum() for x in jax.tree.leaves(params)))}


def _worker(process: int, port: int):
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process)
  assert jax.process_count() == 2 and len(jax.devices()) == 2
  print("RESULT " + json.dumps(_run_steps(process, 2)), flush=True)


@pytest.mark.slow
def test_two_processes_equal_one():
  port = _free_port()
  env_cmd = [sys.executable, __file__]
  procs = [subprocess.Popen(env_cmd + [str(i), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=testing.one_device_env())
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
         for out, _ in outs]
  assert got[0] == got[1]                        # both processes see the same global state
  ref = _run_steps(0, 1)
  np.testing.assert_allclose(got[0]["losses"], ref["losses"], rtol=1e-5)
  np.testing.assert_allclose(got[0]["checksum"], ref["checksum"], rtol=1e-5)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]))
