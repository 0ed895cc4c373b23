"""The study script experiments/inspect_soft_prompt.py: the residual stream and attention
probabilities its method interceptors read from the decoder (GQA Llama, OPT), its per-layer
tables on hand-built prompts (one user; two users averaged, the target's [C] share against
chance) and the LLM's LoRA adapters reaching the attention it reads."""

from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models.llm.llama import LlamaConfig, LlamaDecoder
from allmrec_jax.models.llm.opt import OPTConfig, OPTDecoder

from experiments import inspect_soft_prompt as script

V, E, LAYERS = 64, 32, 2


def _batch():
  rng = np.random.default_rng(0)
  t = 12
  ids = rng.integers(1, V, (2, t)).astype(np.int32)
  mask = np.ones((2, t), np.int32)
  mask[0, -3:] = 0       # right padding
  mask[1, :2] = 0        # left padding: padded keys before the real tokens
  return jnp.asarray(ids), jnp.asarray(mask)


def _init(module):
  return nn.unbox(module.init(jax.random.PRNGKey(1), input_ids=jnp.zeros((1, 4), jnp.int32)))


@pytest.fixture(scope="module")
def tiny():
  """A tiny random Llama (GQA: 4 query heads on 2 KV heads) and a padded batch."""
  cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=64, num_layers=LAYERS,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  module = LlamaDecoder(cfg)
  return module, _init(module), *_batch()


@pytest.fixture(scope="module")
def tiny_opt():
  """A tiny random OPT (learned positions, no rotary) and the same batch."""
  module = OPTDecoder(OPTConfig(vocab_size=V, hidden_size=E, ffn_dim=64, num_layers=LAYERS,
                                num_heads=4))
  return module, _init(module), *_batch()


@pytest.mark.parametrize("decoder", ["tiny", "tiny_opt"])
def test_intermediates(decoder, request):
  module, params, ids, mask = request.getfixturevalue(decoder)
  emb = module.apply(params, ids, method=module.embed)
  logits, residual, probs = jax.jit(
      lambda p, e, m: script.run_with_intermediates(module, p, e, m))(params, emb, mask)
  b, t = ids.shape
  assert probs.shape == (b, LAYERS, t, t) and probs.dtype == np.float32
  assert residual.shape == (b, LAYERS + 1, t, E)
  probs = np.asarray(probs)
  valid = np.asarray(mask).astype(bool)
  future = np.triu(np.ones((t, t), bool), k=1)                      # key j > query i
  for i in range(LAYERS):
    for r in range(b):
      p = probs[r, i][valid[r]]                                      # real queries only
      np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-5)
      assert np.all(p[:, ~valid[r]] == 0.0)                          # padded keys
      assert np.all(probs[r, i][valid[r][:, None] & future] == 0.0)   # causal
  # Reading changes nothing: the same logits as a plain pass.
  plain, aux = module.apply(params, inputs_embeds=emb, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-6, atol=1e-6)
  if decoder == "tiny":
    # The residual stream: the embeddings enter layer 0; the final norm of the last entry
    # is the returned hidden state.
    np.testing.assert_array_equal(np.asarray(residual[:, 0]), np.asarray(emb))
    r = np.asarray(residual[:, -1], np.float64)
    scale = np.asarray(params["params"]["final_norm"]["scale"], np.float64)
    normed = r / np.sqrt((r * r).mean(-1, keepdims=True) + module.config.rms_norm_eps) * scale
    np.testing.assert_allclose(np.asarray(aux["hidden"]), normed, rtol=1e-5, atol=1e-5)


def test_intermediates_refuse_remat(tiny):
  module, params, ids, mask = tiny
  remat = LlamaDecoder(dataclasses.replace(module.config, remat=True))
  with pytest.raises(ValueError, match="without remat"):
    script.run_with_intermediates(remat, params, module.apply(params, ids, method=module.embed),
                                  mask)


def test_script_table():
  """The script's per-layer tables on a hand-built prompt (T = 10: 0 BOS, 1 [U], 2 text,
  3 [H], 4 [C] target, 5 [C], 6-8 text, 9 padding)."""
  t, heads = 10, 2
  attention_mask = np.ones(t, np.int32)
  attention_mask[9] = 0
  attn = np.zeros((LAYERS, heads, t))
  attn[:, :, :9] = 1.0 / 9
  attn[:, 0, 4], attn[:, 0, 5] = 2.0 / 9, 0.0      # head 0 copies the target's [C]
  stats = script.soft_prompt_stats(
      norms=np.ones((LAYERS + 1, t)), answer_attn=attn, attention_mask=attention_mask,
      user_pos=np.array([1, t]), hist_pos=np.array([3, t]), cand_pos=np.array([4, 5]),
      target_slot=4)
  assert all(np.isfinite(v).all() for v in stats["norm"].values())
  np.testing.assert_allclose(stats["mass"]["tgtC"], [1.5 / 9] * LAYERS)
  np.testing.assert_allclose(stats["tgtC_share"], [0.75] * LAYERS)
  np.testing.assert_allclose(stats["tgtC_rank1"], [1.0] * LAYERS)
  np.testing.assert_allclose(stats["head_share"], [[1.0, 0.5]] * LAYERS)
  np.testing.assert_allclose(stats["head_rank1"], [[1.0, 0.0]] * LAYERS)   # a tie: not first
  assert stats["num_candidates"] == 2
  assert len(script.format_table(stats).splitlines()) == 1 + LAYERS + 1
  summary = script.summarize([stats])
  assert summary["copy_head"] == [0] * LAYERS and summary["chance"] == 0.5
  assert len(script.format_table(summary).splitlines()) == (1 + LAYERS + 1) + 3 + LAYERS


def _prompts():
  """Two users' prompts (T = 12: 0 BOS, 1 [U], 2 text, 3 [H], 4 / 6 / 8 the [C] of items
  5, 6, 7, the rest text; the answer tokens at 10-11, user 1's cut to one by padding) with
  targets 6 and 7 (the [C] at 6 and 8)."""
  ids, _ = _batch()
  mask = np.ones((2, 12), np.int32)
  mask[1, 11] = 0
  return {"input_ids": np.asarray(ids), "attention_mask": mask,
          "user_pos": np.array([[1], [1]], np.int32),
          "item_pos": np.array([[3, 4, 6, 8]] * 2, np.int32),
          "item_ids": np.array([[2, 5, 6, 7]] * 2, np.int32),
          "target_pos": np.array([[9, 10], [9, 10]], np.int32),
          "target_ids": np.asarray(ids)[:, 10:12],
          "target_mask": np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)}, np.array([6, 7])


def _forward(module):
  """(variables, batch) -> `inspect_batch` of the batch's token embeddings, jitted."""
  return jax.jit(lambda v, b: script.inspect_batch(
      module, v, module.apply({"params": v["params"]}, b["input_ids"], method=module.embed),
      b))


def test_num_users(tiny, capsys):
  """--num_users=2: two prompts in padded batches, their numbers averaged; shares and rank-1
  rates in [0, 1], chance 1/3 printed."""
  module, params, _, _ = tiny
  arrays, targets = _prompts()
  forward = functools.partial(_forward(module), params)
  out = script.run_batches(forward, arrays, batch_size=3)                  # one padded
  assert out["answer_attn"].shape == (2, LAYERS, 4, 12)
  # The head average of the answer rows is the head-averaged probabilities' (default).
  _, _, probs = script.run_with_intermediates(
      module, params, module.apply(params, jnp.asarray(arrays["input_ids"]),
                                   method=module.embed), jnp.asarray(arrays["attention_mask"]))
  w = arrays["target_mask"]
  rows = np.asarray(probs)[np.arange(2)[:, None], :, arrays["target_pos"]]  # [B, Tt, L, T]
  want = (rows * w[..., None, None]).sum(1) / w.sum(1)[:, None, None]
  np.testing.assert_allclose(out["answer_attn"].mean(2), want, rtol=1e-5, atol=1e-6)

  per_user = script.prompt_stats(out, arrays, 1, targets)
  summary = script.summarize(per_user)
  one = [script.summarize([u]) for u in per_user]
  np.testing.assert_allclose(summary["tgtC_share"],
                             np.mean([o["tgtC_share"] for o in one], 0), rtol=1e-9)
  for key in ("tgtC_share", "tgtC_rank1", "copy_share", "copy_rank1"):
    v = np.asarray(summary[key])
    assert v.shape == (LAYERS,) and np.all((v >= 0) & (v <= 1)), (key, v)
  assert all(0 <= h < 4 for h in summary["copy_head"])
  np.testing.assert_allclose(summary["copy_share"], np.max(summary["head_share"], -1))

  script.report({"num_users": 2, "num_candidates": 3}, summary)
  text = capsys.readouterr().out
  assert "chance (1/num_candidates) = 0.3333" in text
  record = json.loads(text.splitlines()[-1])
  assert record["chance"] == round(1 / 3, 5) and record["num_users"] == 2
  assert len(record["tgtC_share"]) == LAYERS and len(record["head_share"][0]) == 4


def test_adapters_change_attention(tiny):
  """The LLM with nonzero LoRA adapters (as a trained run's checkpoint holds) gives other
  answer attention and answer log-likelihoods than the frozen LLM (--no_lora); the fresh
  adapters (B = 0) give the frozen LLM's; reading changes nothing."""
  module, params, _, _ = tiny
  lora_module = LlamaDecoder(dataclasses.replace(module.config, lora_rank=2,
                                                 lora_targets=("q", "k", "v", "o")))
  fresh = nn.unbox(lora_lib.init_adapters(lora_module, params, jax.random.PRNGKey(2)))
  trained = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.5 * jax.random.normal(jax.random.PRNGKey(3), x.shape)
                       if path[-1].key == "b" else x), fresh)
  arrays, _ = _prompts()
  forward = _forward(lora_module)
  run = lambda lora: script.run_batches(
      functools.partial(forward, lora_lib.with_adapters(params, lora)), arrays, batch_size=2)
  frozen, zero, adapted = run(None), run({"lora": fresh}), run({"lora": trained})
  for k in ("answer_attn", "tok_logp"):
    np.testing.assert_allclose(zero[k], frozen[k], rtol=1e-6, atol=1e-7)
    assert np.abs(adapted[k] - frozen[k]).max() > 1e-3, k
  variables = lora_lib.with_adapters(params, {"lora": trained})
  emb = lora_module.apply(params, jnp.asarray(arrays["input_ids"]), method=lora_module.embed)
  logits, _, _ = script.run_with_intermediates(lora_module, variables, emb,
                                               jnp.asarray(arrays["attention_mask"]))
  plain, _ = lora_module.apply(variables, inputs_embeds=emb,
                               attention_mask=jnp.asarray(arrays["attention_mask"]))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-6, atol=1e-6)
