"""The opt-in attention/residual intermediates of the decoder, and the aggregation of
scripts/inspect_soft_prompt.py on a hand-built prompt."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax.models.llm.llama import LlamaConfig, LlamaDecoder

ROOT = pathlib.Path(__file__).resolve().parents[2]
V, E, LAYERS = 64, 32, 2


def _load_script():
  spec = importlib.util.spec_from_file_location("inspect_soft_prompt",
                                                ROOT / "scripts" / "inspect_soft_prompt.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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


def test_run_with_intermediates_shapes(tiny):
  script = _load_script()
  module, params, ids, mask = tiny
  emb = module.apply(params, ids, method=module.embed)
  logits, residual, probs = jax.jit(
      lambda p, e, m: script.run_with_intermediates(module, p, e, m))(params, emb, mask)
  assert logits.shape == (2, 12, V)
  assert residual.shape == (2, LAYERS + 1, 12, E)
  assert probs.shape == (2, LAYERS, 12, 12)
  logits0, _ = module.apply(params, inputs_embeds=emb, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits0), rtol=1e-5, atol=1e-5)


def _hand_built():
  """T = 10: 0 BOS, 1 [U], 2 text, 3 [H], 4 [C] (target), 5 [C], 6-8 text, 9 padding;
  the answer queries are 6 and 7."""
  t = 10
  mask = np.ones(t, np.int32)
  mask[9] = 0
  values = np.array([100, 3, 1, 4, 5, 7, 2, 3, 4, 1000], np.float64)   # |residual| per pos
  residual = np.zeros((LAYERS + 1, t, 2))
  for l in range(LAYERS + 1):
    residual[l, :, 1] = values * (l + 1)                    # norm = value * (l + 1)
  attn = np.full((LAYERS, t, t), 0.01)
  attn[0, 6] = [0.5, 0.1, 0.0, 0.1, 0.2, 0.05, 0.05, 0, 0, 0]
  attn[0, 7] = [0.3, 0.3, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 0, 0]
  attn[1, 6] = [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
  attn[1, 7] = [0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 0.3, 0.5, 0, 0]
  return dict(residual=residual, attn=attn, attention_mask=mask, user_pos=np.array([1, t]),
              hist_pos=np.array([3, t]), cand_pos=np.array([4, 5]), target_slot=4,
              target_pos=np.array([6, 7, 0]), target_mask=np.array([1.0, 1.0, 0.0]))


def test_soft_prompt_stats_hand_built():
  script = _load_script()
  stats = script.soft_prompt_stats(**_hand_built())
  norm, mass = stats["norm"], stats["mass"]
  for l in range(LAYERS + 1):
    s = l + 1
    assert norm["pos0"][l] == pytest.approx(100 * s)
    assert norm["U"][l] == pytest.approx(3 * s)
    assert norm["H"][l] == pytest.approx(4 * s)
    assert norm["C"][l] == pytest.approx(6 * s)              # (5 + 7) / 2
    assert norm["text"][l] == pytest.approx(2.5 * s)         # positions 2, 6, 7, 8; not pad
  expected = {"pos0": [0.4, 0.5], "U": [0.2, 0.0], "H": [0.05, 0.0], "C": [0.225, 0.0],
              "tgtC": [0.15, 0.0], "rest": [0.125, 0.5]}
  for g, want in expected.items():
    assert mass[g] == pytest.approx(want, abs=1e-12), g
  assert len(script.format_table(stats).splitlines()) == 1 + LAYERS + 1


def test_soft_prompt_stats_user_at_position_zero():
  """bos=none: [U] at position 0 counts as pos0; an empty group is NaN, not 0."""
  script = _load_script()
  case = _hand_built()
  case["user_pos"] = np.array([0])
  case["hist_pos"] = np.array([10, 10])
  stats = script.soft_prompt_stats(**case)
  assert all(math.isnan(x) for x in stats["norm"]["U"] + stats["norm"]["H"])
  assert stats["mass"]["U"] == [0.0, 0.0]
  assert stats["norm"]["text"][0] == pytest.approx((1 + 3 + 4 + 2 + 3 + 4) / 6)
  assert stats["mass"]["rest"][0] == pytest.approx(0.125 + 0.2 + 0.05, abs=1e-12)
