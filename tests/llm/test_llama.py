"""LlamaDecoder parity with transformers' PyTorch LlamaForCausalLM (fp32, max abs 1e-4).

Random small configs (GQA, tied/untied, rope scaling kinds) and the real embedded
SmolLM2-135M-Instruct GGUF (reference weights read by transformers' own GGUF loader, which
un-permutes q/k independently of ours). Incremental decoding with the KV cache must equal
the full forward pass.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from allmrec_jax.models import llm as llm_models
from allmrec_jax.models.llm import LlamaConfig, LlamaDecoder, init_cache
from allmrec_jax.weights import gguf as gguf_lib
from allmrec_jax.weights import hf as hf_lib
from allmrec_jax.weights import llm as llm_lib

TOL = 1e-4
# SmolLM2's residual stream reaches ~2.3e4 (massive activations), so fp32 round-off differs
# between implementations. Measured on the padded batch below: max |ours - transformers fp32|
# = 1.41e-4 (at the first token "The" of prompt 0, where attention is trivial: matmul / norm
# round-off), <= 8.6e-5 on the other prompts; against transformers in float64 ours is 1.7e-4
# off and transformers fp32 4e-5 off, on logits of magnitude ~30. The gap is XLA:CPU's dot
# accumulation order in the MLP down-projection that creates the massive activation (layer 2):
# splitting that contraction into 48 partial sums makes ours more accurate than transformers
# fp32, but costs speed, so the production path keeps plain dots. Real-model tolerance: 3e-4.
REAL_TOL = 3e-4
GGUF_TIED_HEAD = "output.weight"


def _hf_llama(seed=0, **kw):
  torch.manual_seed(seed)
  base = dict(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, rms_norm_eps=1e-5)
  base.update(kw)
  hf_config = transformers.LlamaConfig(**base)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():  # non-trivial norm scales
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return hf_config, model


def _ours(hf_config, model, **overrides):
  config = LlamaConfig.from_hf(hf_config, **overrides)
  module = LlamaDecoder(config)
  params = llm_lib.load_params(module, config, hf_lib.DictSource(model.state_dict()))
  return module, params


def _left_padded(rng, vocab, batch, length):
  ids = rng.randint(0, vocab, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  for b in range(1, batch):
    mask[b, :2 * b] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()


def _masked_max_diff(a, b, mask):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) * mask[..., None]))


RANDOM_CONFIGS = {
    "gqa_untied_llama3": dict(tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8), rope_theta=500000.0),
    "mha_tied_default": dict(num_key_value_heads=8, tie_word_embeddings=True),
    "gqa_linear_bias": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                            rope_scaling=dict(rope_type="linear", factor=2.0)),
    "mqa_dynamic": dict(num_key_value_heads=1, max_position_embeddings=8,
                        rope_scaling=dict(rope_type="dynamic", factor=2.0)),
}


@pytest.mark.parametrize("name", sorted(RANDOM_CONFIGS))
def test_random_config_matches_transformers(name):
  hf_config, model = _hf_llama(**RANDOM_CONFIGS[name])
  module, params = _ours(hf_config, model)
  ids, mask = _left_padded(np.random.RandomState(1), hf_config.vocab_size, 3, 13)
  ref = _torch_logits(model, ids, mask)
  logits, aux = jax.jit(module.apply)({"params": params}, input_ids=ids, attention_mask=mask)
  assert logits.shape == ref.shape and logits.dtype == jnp.float32
  assert aux["hidden"].shape == (3, 13, 64) and aux["cache"] is None
  diff = _masked_max_diff(logits, ref, mask)
  assert diff < TOL, (name, diff)


def test_rope_scaling_changes_logits():
  """The llama3 scaling is not a no-op at these positions (so the parity above is a real check)."""
  kw = dict(RANDOM_CONFIGS["gqa_untied_llama3"])
  hf_config, model = _hf_llama(**kw)
  module, params = _ours(hf_config, model)
  plain = LlamaDecoder(LlamaConfig.from_hf(hf_config, rope_scaling=None))
  ids = np.arange(40, dtype=np.int32)[None] % 101
  a, _ = jax.jit(module.apply)({"params": params}, input_ids=ids)
  b, _ = jax.jit(plain.apply)({"params": params}, input_ids=ids)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def _decode_matches_full(module, params, config, ids, mask, prefill):
  """Prefill `prefill` tokens into a cache, then feed the rest one by one."""
  b, t = ids.shape
  full, _ = jax.jit(module.apply)({"params": params}, input_ids=ids, attention_mask=mask)
  window = t + 3  # slots beyond the sequence stay masked
  cache = init_cache(config, b, window)
  cache_mask = np.zeros((b, window), np.int32)
  cache_mask[:, :t] = mask
  step = jax.jit(lambda p, i, m, c: module.apply({"params": p}, input_ids=i, attention_mask=m,
                                                 cache=c))
  logits, aux = step(params, ids[:, :prefill], cache_mask, cache)
  outs = [logits]
  cache = aux["cache"]
  assert int(cache["end"]) == prefill
  for s in range(prefill, t):
    logits, aux = step(params, ids[:, s:s + 1], cache_mask, cache)
    cache = aux["cache"]
    outs.append(logits)
  assert int(cache["end"]) == t
  inc = jnp.concatenate(outs, axis=1)
  return _masked_max_diff(inc, full, mask)


def test_cache_decoding_equals_full_forward():
  hf_config, model = _hf_llama(**RANDOM_CONFIGS["gqa_untied_llama3"])
  module, params = _ours(hf_config, model)
  ids, mask = _left_padded(np.random.RandomState(2), hf_config.vocab_size, 3, 12)
  assert _decode_matches_full(module, params, module.config, ids, mask, prefill=7) < TOL


def test_inputs_embeds_and_explicit_positions():
  hf_config, model = _hf_llama(**RANDOM_CONFIGS["gqa_untied_llama3"])
  module, params = _ours(hf_config, model)
  ids, mask = _left_padded(np.random.RandomState(3), hf_config.vocab_size, 2, 9)
  by_ids, _ = module.apply({"params": params}, input_ids=ids, attention_mask=mask)
  emb = module.apply({"params": params}, ids, method="embed")
  by_emb, aux = module.apply({"params": params}, inputs_embeds=emb, attention_mask=mask)
  np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(by_emb))
  # compute_logits=False + logits() on the hidden states = the full logits
  none, aux2 = module.apply({"params": params}, inputs_embeds=emb, attention_mask=mask,
                            compute_logits=False)
  assert none is None
  head = module.apply({"params": params}, aux2["hidden"], method="logits")
  np.testing.assert_allclose(np.asarray(head), np.asarray(by_ids), atol=1e-6)
  # explicit positions: shifting every position by 5 equals transformers with shifted ids
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0) + 5
  ours, _ = module.apply({"params": params}, input_ids=ids, attention_mask=mask, positions=pos)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
  assert _masked_max_diff(ours, ref, mask) < TOL


def test_bfloat16_close_to_float32():
  hf_config, model = _hf_llama(**RANDOM_CONFIGS["mha_tied_default"])
  module, params = _ours(hf_config, model)
  module16, params16 = _ours(hf_config, model, dtype="bfloat16", param_dtype="bfloat16")
  assert params16["embed"]["embedding"].dtype == jnp.bfloat16
  ids = np.random.RandomState(4).randint(0, 101, (2, 10)).astype(np.int32)
  a, _ = jax.jit(module.apply)({"params": params}, input_ids=ids)
  b, aux = jax.jit(module16.apply)({"params": params16}, input_ids=ids)
  assert b.dtype == jnp.float32 and aux["hidden"].dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(a)))
  assert float(jnp.max(jnp.abs(a - b))) < 0.05 * scale


def test_bf16_matmuls_close_to_float32_with_float32_state():
  """matmul_dtype=bfloat16: float32 parameters, hidden states and logits; dense and head
  matmuls from bfloat16 operands (close to float32, not equal); gradients to
  inputs_embeds flow and stay close (stage 2 trains through the frozen LLM)."""
  for name in ("mha_tied_default", "gqa_untied_llama3"):
    hf_config, model = _hf_llama(**RANDOM_CONFIGS[name])
    module, params = _ours(hf_config, model)
    mixed = LlamaDecoder(LlamaConfig.from_hf(hf_config, matmul_dtype="bfloat16"))
    ids = np.random.RandomState(6).randint(0, 101, (2, 10)).astype(np.int32)
    a, _ = jax.jit(module.apply)({"params": params}, input_ids=ids)
    b, aux = jax.jit(mixed.apply)({"params": params}, input_ids=ids)
    assert b.dtype == jnp.float32 and aux["hidden"].dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(a)))
    diff = float(jnp.max(jnp.abs(a - b)))
    assert 0 < diff < 0.05 * scale, (name, diff, scale)
    emb = module.apply({"params": params}, ids, method="embed")

    def loss(m, params=params):
      return lambda e: jnp.sum(m.apply({"params": params}, inputs_embeds=e)[0][:, -1] ** 2)
    g32 = jax.jit(jax.grad(loss(module)))(emb)
    g16 = jax.jit(jax.grad(loss(mixed)))(emb)
    assert g16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32))
    assert rel < 0.05, (name, rel)


def test_remat_same_values_and_grads():
  hf_config, model = _hf_llama(num_hidden_layers=1, **RANDOM_CONFIGS["gqa_untied_llama3"])
  module, params = _ours(hf_config, model)
  remat = LlamaDecoder(LlamaConfig.from_hf(hf_config, remat=True))
  ids = np.random.RandomState(5).randint(0, 101, (2, 8)).astype(np.int32)

  def loss(m):
    def f(emb):
      _, aux = m.apply({"params": params}, inputs_embeds=emb, compute_logits=False)
      return jnp.sum(aux["hidden"] ** 2)
    return f
  emb = module.apply({"params": params}, ids, method="embed")
  g1 = jax.jit(jax.grad(loss(module)))(emb)
  g2 = jax.jit(jax.grad(loss(remat)))(emb)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- real SmolLM2-135M

@pytest.fixture(scope="module")
def smollm():
  """(ours: LoadedLLM, reference torch model in fp32) for the embedded SmolLM2-135M GGUF.

  The reference receives the GGUF tensors under transformers' names, un-permuted by
  transformers' own LlamaTensorProcessor (not by our code); test_smollm_gguf_layout checks
  our GGUF source against the same transformers functions tensor by tensor.
  """
  from transformers.initialization import no_init_weights
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
  path = llm_lib.resolve_path(None)
  ours = llm_lib.load_llm(path)
  c = ours.config
  hf_config = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
      rope_theta=c.rope_theta, max_position_embeddings=8192, tie_word_embeddings=True)
  with no_init_weights():
    model = transformers.LlamaForCausalLM(hf_config)
  header = gguf_lib.read_header(path)
  proc = LlamaTensorProcessor(config={"num_attention_heads": c.num_heads,
                                      "num_key_value_heads": c.num_kv_heads})
  state = {}
  for t in header.tensors:
    name = gguf_lib.GGUFSource.hf_name(t.name)
    if name is not None:
      w = proc.process(weights=gguf_lib.tensor_array(header, t), name=t.name).weights
      state[name] = torch.from_numpy(np.array(w))
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model.tie_weights()
  return ours, model.eval()


def test_smollm_gguf_layout_matches_transformers_loader():
  """Our GGUF names and q/k un-permutation agree with transformers' GGUF loader."""
  from transformers.modeling_gguf_pytorch_utils import (LlamaTensorProcessor,
                                                        get_gguf_hf_weights_map)
  path = llm_lib.resolve_path(None)
  config, source, _ = llm_lib.read_config(path)
  hf_config = transformers.LlamaConfig(  # 2 layers: the map of every layer is the same
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=2,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, tie_word_embeddings=True)
  with torch.device("meta"):
    meta = transformers.LlamaForCausalLM(hf_config)
  proc = LlamaTensorProcessor(config={"num_attention_heads": config.num_heads,
                                      "num_key_value_heads": config.num_kv_heads})
  theirs = get_gguf_hf_weights_map(meta, proc)
  header = source.reader
  ours_map = {t.name: gguf_lib.GGUFSource.hf_name(t.name) for t in header.tensors}
  first_two = {k: v for k, v in ours_map.items()
               if v and not re.match(r"blk\.([2-9]|\d\d)\.", k)}
  assert first_two == {k: v for k, v in theirs.items() if k in ours_map}
  assert GGUF_TIED_HEAD in theirs and GGUF_TIED_HEAD not in ours_map  # tied: no output.weight
  assert len(source.names()) == len(header.tensors) == 272
  for t in header.tensors:
    if t.name.startswith("blk.3.attn_") and t.name.endswith(".weight"):
      ref = proc.process(weights=gguf_lib.tensor_array(header, t), name=t.name).weights
      np.testing.assert_array_equal(source.get(ours_map[t.name]), ref)


PROMPTS = ["The capital of France is",
           "<|im_start|>user\nRecommend a movie like Toy Story.<|im_end|>\n<|im_start|>assistant\n",
           "1, 2, 3, 4,"]


def test_smollm_config(smollm):
  ours, _ = smollm
  c = ours.config
  assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
      49152, 576, 30, 9, 3, 64)
  assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.eos_token_ids == (2,)


def test_smollm_left_padded_batch_matches_transformers(smollm):
  """Token ids and (perturbed, soft-token-like) inputs_embeds, left-padded batch."""
  ours, model = smollm
  enc = ours.tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  assert mask.min() == 0  # really padded
  ref = _torch_logits(model, ids, mask)
  apply = jax.jit(ours.module.apply)
  logits, _ = apply({"params": ours.params}, input_ids=ids, attention_mask=mask)
  diff = _masked_max_diff(logits, ref, mask)
  assert diff < REAL_TOL, diff
  # the model knows the answer (prompt 0 is left-padded)
  assert ours.tokenizer.decode(int(jnp.argmax(logits[0, -1]))).strip() == "Paris"

  emb = ours.module.apply({"params": ours.params}, ids, method="embed")
  emb = np.asarray(emb) + 0.01 * np.random.RandomState(0).randn(*emb.shape).astype(np.float32)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    ref = model(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
  logits, _ = apply({"params": ours.params}, inputs_embeds=emb, attention_mask=mask)
  diff = _masked_max_diff(logits, ref, mask)
  assert diff < REAL_TOL, diff


def test_smollm_bf16_matmuls_still_answer(smollm):
  """The real SmolLM2 with llm.matmul_dtype=bfloat16 (same float32 weights): logits within
  bfloat16 rounding of the float32 reference and the same top token at every position."""
  ours, model = smollm
  mixed = llm_models.make_decoder(dataclasses.replace(ours.config, matmul_dtype="bfloat16"))
  enc = ours.tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  ref = _torch_logits(model, ids, mask)
  logits, _ = jax.jit(mixed.apply)({"params": ours.params}, input_ids=ids, attention_mask=mask)
  diff = _masked_max_diff(logits, ref, mask)
  assert REAL_TOL < diff < 1.0, diff
  m = mask.astype(bool)
  assert (np.asarray(logits).argmax(-1) == ref.argmax(-1))[m].mean() > 0.9
  assert ours.tokenizer.decode(int(jnp.argmax(logits[0, -1]))).strip() == "Paris"


@pytest.mark.slow
def test_smollm_cache_decoding_equals_full_forward(smollm):
  ours, _ = smollm
  enc = ours.tokenizer(PROMPTS[:2], padding=True, padding_side="left", return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  ids, mask = ids[:, :-2], mask[:, :-2]  # keep it short
  t = ids.shape[1]
  assert _decode_matches_full(ours.module, ours.params, ours.config, ids, mask, prefill=t - 3) < TOL


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_llama_family_variants_match_transformers(arch):
  """Qwen2 (q/k/v biases) and Mistral (sliding window of 4 over 12 tokens) as Llama configs."""
  torch.manual_seed(3)
  kw = dict(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False)
  if arch == "qwen2":
    hf_config = transformers.Qwen2Config(**kw)
    model = transformers.Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith(".bias"):
          p.add_(0.5 * torch.randn_like(p))
  else:
    hf_config = transformers.MistralConfig(sliding_window=4, **kw)
    model = transformers.MistralForCausalLM(hf_config).eval()
  config = LlamaConfig.from_hf(hf_config)
  assert config.qkv_bias == (arch == "qwen2")
  assert config.sliding_window == (4 if arch == "mistral" else None)
  module = LlamaDecoder(config)
  params = llm_lib.load_params(module, config, hf_lib.DictSource(model.state_dict()))
  ids = np.random.RandomState(6).randint(0, 101, (2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  ref = _torch_logits(model, ids, mask)
  logits, _ = jax.jit(module.apply)({"params": params}, input_ids=ids, attention_mask=mask)
  assert _masked_max_diff(logits, ref, mask) < TOL
  if arch == "mistral":  # the window matters here
    plain = LlamaDecoder(LlamaConfig.from_hf(hf_config, sliding_window=None))
    full, _ = jax.jit(plain.apply)({"params": params}, input_ids=ids, attention_mask=mask)
    assert float(jnp.max(jnp.abs(full - logits))) > 1e-3
