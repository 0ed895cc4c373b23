"""OPTDecoder parity with transformers' PyTorch OPTForCausalLM (fp32, max abs 1e-4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from allmrec_jax.models.llm import OPTConfig, OPTDecoder, init_cache
from allmrec_jax.weights import hf as hf_lib
from allmrec_jax.weights import llm as llm_lib

TOL = 1e-4


def _hf_opt(seed=0, **kw):
  torch.manual_seed(seed)
  base = dict(vocab_size=103, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=64,
              dropout=0.0, pad_token_id=1)
  base.update(kw)
  hf_config = transformers.OPTConfig(**base)
  model = transformers.OPTForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return hf_config, model


def _ours(hf_config, model):
  config = OPTConfig.from_hf(hf_config)
  module = OPTDecoder(config)
  params = llm_lib.load_params(module, config, hf_lib.DictSource(model.state_dict()))
  return module, params


def _batch(rng, vocab, batch, length, side):
  ids = rng.randint(3, vocab, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  for b in range(1, batch):
    if side == "left":
      mask[b, :2 * b] = 0
    else:
      mask[b, length - 2 * b:] = 0
  return ids, mask


def _masked_max_diff(a, b, mask):
  return float(np.max(np.where(mask[..., None] > 0, np.abs(np.asarray(a) - np.asarray(b)), 0)))


CONFIGS = {
    "pre_ln": dict(do_layer_norm_before=True),
    "post_ln_project": dict(do_layer_norm_before=False, word_embed_proj_dim=32),  # OPT-350m style
    "pre_ln_project_no_affine": dict(word_embed_proj_dim=48, layer_norm_elementwise_affine=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_matches_transformers(name, side):
  hf_config, model = _hf_opt(**CONFIGS[name])
  module, params = _ours(hf_config, model)
  c = module.config
  assert c.has_projections == (hf_config.word_embed_proj_dim != hf_config.hidden_size)
  assert ("project_in" in params) == c.has_projections and ("final_norm" in params) == (
      hf_config.do_layer_norm_before and hf_config.layer_norm_elementwise_affine)
  ids, mask = _batch(np.random.RandomState(1), hf_config.vocab_size, 3, 11, side)
  with torch.no_grad():  # transformers derives OPT positions from the mask itself
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  logits, aux = jax.jit(module.apply)({"params": params}, input_ids=ids, attention_mask=mask)
  assert aux["hidden"].shape == (3, 11, hf_config.hidden_size)
  assert _masked_max_diff(logits, ref, mask) < TOL


def test_inputs_embeds_width_and_logits_head():
  hf_config, model = _hf_opt(**CONFIGS["post_ln_project"])
  module, params = _ours(hf_config, model)
  ids, mask = _batch(np.random.RandomState(2), hf_config.vocab_size, 2, 9, "left")
  emb = module.apply({"params": params}, ids, method="embed")
  assert emb.shape == (2, 9, 32)  # word_embed_proj_dim, before project_in
  emb = np.asarray(emb) + 0.01 * np.random.RandomState(3).randn(*emb.shape).astype(np.float32)
  with torch.no_grad():
    ref = model(inputs_embeds=torch.tensor(emb),
                attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  apply = jax.jit(module.apply, static_argnames=("compute_logits",))
  logits, _ = apply({"params": params}, inputs_embeds=emb, attention_mask=mask)
  assert _masked_max_diff(logits, ref, mask) < TOL
  none, aux = apply({"params": params}, inputs_embeds=emb, attention_mask=mask,
                    compute_logits=False)
  assert none is None
  head = module.apply({"params": params}, aux["hidden"], method="logits")  # incl. project_out
  np.testing.assert_allclose(np.asarray(head), np.asarray(logits), atol=1e-5)


@pytest.mark.parametrize("name", ["pre_ln", "post_ln_project"])
def test_cache_decoding_equals_full_forward(name):
  hf_config, model = _hf_opt(**CONFIGS[name])
  module, params = _ours(hf_config, model)
  ids, mask = _batch(np.random.RandomState(4), hf_config.vocab_size, 3, 10, "left")
  full, _ = jax.jit(module.apply)({"params": params}, input_ids=ids, attention_mask=mask)
  window = 12
  cache = init_cache(module.config, 3, window)
  cache_mask = np.zeros((3, window), np.int32)
  cache_mask[:, :10] = mask
  step = jax.jit(lambda p, i, c: module.apply({"params": p}, input_ids=i, attention_mask=cache_mask,
                                              cache=c))
  logits, aux = step(params, ids[:, :6], cache)
  outs = [logits]
  for s in range(6, 10):
    logits, aux = step(params, ids[:, s:s + 1], aux["cache"])
    outs.append(logits)
  assert int(aux["cache"]["end"]) == 10
  assert _masked_max_diff(jnp.concatenate(outs, 1), full, mask) < TOL


def test_published_sizes_are_configs():
  """Published OPT sizes map to configs (shapes only, no weights; 350m = post-LN + proj)."""
  sizes = {"125m": (768, 12, 12), "350m": (1024, 24, 16), "6.7b": (4096, 32, 32)}
  for name, (e, layers, heads) in sizes.items():
    kw = dict(hidden_size=e, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * e)
    if name == "350m":
      kw.update(word_embed_proj_dim=512, do_layer_norm_before=False)
    c = OPTConfig.from_hf(transformers.OPTConfig(**kw))
    module = OPTDecoder(c)
    shapes = jax.eval_shape(lambda m=module: m.init(jax.random.PRNGKey(0),
                                                    input_ids=jnp.zeros((1, 1), jnp.int32)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert c.head_dim * heads == e
    assert 0.8 < n / (12 * layers * e * e + 50272 * c.embed_dim) < 1.2, (name, n)


def test_bf16_matmuls_close_to_float32():
  """OPT with matmul_dtype=bfloat16 (project_in/out, tied head included): float32 logits
  close to the float32 model's, not equal."""
  hf_config, model = _hf_opt(**CONFIGS["post_ln_project"])
  module, params = _ours(hf_config, model)
  mixed = OPTDecoder(OPTConfig.from_hf(hf_config, matmul_dtype="bfloat16"))
  ids = np.random.RandomState(7).randint(0, hf_config.vocab_size, (2, 9)).astype(np.int32)
  a, _ = jax.jit(module.apply)({"params": params}, input_ids=ids)
  b, _ = jax.jit(mixed.apply)({"params": params}, input_ids=ids)
  assert b.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(a)))
  diff = float(jnp.max(jnp.abs(a - b)))
  assert 0 < diff < 0.05 * scale, (diff, scale)
