"""The opt-in attention/residual intermediates of the decoder, and a smoke test of the study
script experiments/inspect_soft_prompt.py on them and on a hand-built prompt."""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax.models.llm.llama import LlamaConfig, LlamaDecoder

from experiments import inspect_soft_prompt as script

V, E, LAYERS = 64, 32, 2



@pytest.fixture(scope="module")
def tiny():
  """A tiny random Llama (GQA: 4 query heads on 2 KV heads) and a padded batch."""
  cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=64, num_layers=LAYERS,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  module = LlamaDecoder(cfg)
  params = nn.unbox(module.init(jax.random.PRNGKey(1), input_ids=jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(0)
  t = 12
  ids = rng.integers(1, V, (2, t)).astype(np.int32)
  mask = np.ones((2, t), np.int32)
  mask[0, -3:] = 0       # right padding
  mask[1, :2] = 0        # left padding: padded keys before the real tokens
  return module, params, jnp.asarray(ids), jnp.asarray(mask)


def test_sown_attention_probs(tiny):
  module, params, ids, mask = tiny
  (logits, aux), state = module.apply(params, ids, attention_mask=mask,
                                      mutable=["intermediates"])
  inter = state["intermediates"]
  b, t = ids.shape
  valid = np.asarray(mask).astype(bool)
  future = np.triu(np.ones((t, t), bool), k=1)                      # key j > query i
  for i in range(LAYERS):
    (probs,) = inter[f"layers_{i}"]["attn"]["attn_probs"]
    probs = np.asarray(probs)
    assert probs.shape == (b, t, t) and probs.dtype == np.float32
    for r in range(b):
      p = probs[r][valid[r]]                                         # real queries only
      np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-5)
      assert np.all(p[:, ~valid[r]] == 0.0)                          # padded keys
      assert np.all(probs[r][valid[r][:, None] & future] == 0.0)      # causal
  # The residual stream: the embeddings enter layer 0; the final norm of the last entry
  # is the returned hidden state.
  residual = inter["residual"]
  assert len(residual) == LAYERS + 1
  emb = module.apply(params, ids, method=module.embed)
  np.testing.assert_array_equal(np.asarray(residual[0]), np.asarray(emb))
  r = np.asarray(residual[-1], np.float64)
  scale = np.asarray(params["params"]["final_norm"]["scale"], np.float64)
  normed = r / np.sqrt((r * r).mean(-1, keepdims=True) + module.config.rms_norm_eps) * scale
  np.testing.assert_allclose(np.asarray(aux["hidden"]), normed, rtol=1e-5, atol=1e-5)
  # Sowing changes nothing: the same outputs without the mutable collection.
  logits0, aux0 = module.apply(params, ids, attention_mask=mask)
  np.testing.assert_array_equal(np.asarray(logits0), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(aux0["hidden"]), np.asarray(aux["hidden"]))
  # ... and no intermediates are computed when nothing asks for them.
  _, state0 = module.apply(params, ids, attention_mask=mask, mutable=["params"])
  assert "intermediates" not in state0


def test_script_smoke(tiny):
  """The script's decoder pass and its per-layer table on a hand-built prompt (T = 10:
  0 BOS, 1 [U], 2 text, 3 [H], 4 [C] target, 5 [C], 6-8 text, 9 padding)."""
  module, params, ids, mask = tiny
  emb = module.apply(params, ids, method=module.embed)
  logits, residual, probs = jax.jit(
      lambda p, e, m: script.run_with_intermediates(module, p, e, m))(params, emb, mask)
  assert logits.shape == (2, 12, V)
  assert residual.shape == (2, LAYERS + 1, 12, E)
  assert probs.shape == (2, LAYERS, 12, 12)
  t = 10
  attention_mask = np.ones(t, np.int32)
  attention_mask[9] = 0
  stats = script.soft_prompt_stats(
      residual=np.ones((LAYERS + 1, t, 2)), attn=np.full((LAYERS, t, t), 0.1),
      attention_mask=attention_mask, user_pos=np.array([1, t]), hist_pos=np.array([3, t]),
      cand_pos=np.array([4, 5]), target_slot=4, target_pos=np.array([6, 7, 0]),
      target_mask=np.array([1.0, 1.0, 0.0]))
  assert all(np.isfinite(v).all() for v in stats["norm"].values())
  assert len(script.format_table(stats).splitlines()) == 1 + LAYERS + 1
