"""Stage-2 training resumed from its checkpoint equals an uninterrupted run (with the
catalog match term and its extra examples on, whose draws must follow the resume too, and
LoRA adapters trained with the projectors, which the checkpoint must carry)."""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import transformers

from allmrec_jax import assets
from allmrec_jax.data import prepare
from allmrec_jax.models.llm import LlamaConfig, LlamaDecoder
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import stage2, stage2_run, variants
from configs import ml100k


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
  c = ml100k.get_config()
  c.stage2.batch_size, c.stage2.ckpt_every, c.stage2.log_every = 2, 2, 1
  c.stage2.user_match_weight, c.stage2.user_match_negatives = 0.5, "catalog"
  c.stage2.user_match_batch = 3
  c.stage2.train_lora = True
  c.stage2.len_bucket = 512      # one prompt length: one compiled step
  ds = prepare.prepare_dataset(c.data)
  gguf = assets.get_asset("smollm2-135m")
  tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
                    lora_rank=2, lora_targets=("q", "v"))
  llm = LlamaDecoder(cfg)
  llm_params = nn.unbox(llm.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 4), jnp.int32)))
  builder = stage2_run.prompt_builder(ds, tok, c.stage2)
  table = np.random.default_rng(0).uniform(size=(ds.num_items + 1, 8)).astype(np.float32)
  rep_fn = lambda seq: (seq[:, -4:] % 7).astype(np.float32)

  def run(workdir, max_steps, stop_after=None):
    c.stage2.max_steps = max_steps
    with monkeypatch.context() as m:
      if stop_after is not None:     # interrupted after that step (its checkpoint kept)
        m.setattr(loop_lib, "run", functools.partial(loop_lib.run, stop_after=stop_after))
      return stage2.train(c, workdir, ds, variant=variants.VARIANTS["allmrec"], llm=llm,
                          llm_params=llm_params,
                          builder=builder, user_rep_fn=rep_fn, item_table=table)

  straight = run(tmp_path / "a", 4)
  run(tmp_path / "b", 4, stop_after=2)         # interrupted after 2 steps (checkpointed)
  assert loop_lib.finished(tmp_path / "b" / "stage2") is None
  resumed = run(tmp_path / "b", 4)             # resumes at step 2, batch 2
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=1e-6, atol=1e-7),
               resumed, straight)
  lines = (tmp_path / "b" / "stage2" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 4 and all("train/match_loss" in l for l in lines)
  moved = jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))),
                       resumed, run(tmp_path / "c", 1))
  assert any(jax.tree.leaves(moved["params"])) and all(jax.tree.leaves(
      jax.tree.map(lambda x: x, moved["lora"]["layers_0"]["attn"]["v"])))
