"""KV-cache generation and continuation scoring against transformers (PyTorch, CPU).

Fast tests use a tiny random Llama written by transformers (`save_pretrained`) and loaded
with our weight loader; the slow ones use the embedded SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax import generate as gen
from allmrec_jax import scoring
from allmrec_jax import testing
from allmrec_jax.weights import llm as llm_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# One reference thread: on the shared 2-core machine, torch's OpenMP workers spin-wait
# when oversubscribed, turning a 0.2 s forward into several seconds.
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------
# Tiny random Llama.

PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(our module, our params, transformers model, model dir) of one tiny random Llama."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      initializer_range=0.3, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
      pad_token_id=PAD)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  path = tmp_path_factory.mktemp("tiny_llama")
  hf.save_pretrained(path)
  config, source, _ = llm_weights.read_config(path)
  module = llm_weights.llm_models.make_decoder(config)
  params = llm_weights.load_params(module, config, source)
  return module, params, hf, path


def _left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), PAD, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    ids[i, width - len(r):] = r
    mask[i, width - len(r):] = 1
  return ids, mask


PROMPTS = [[1, 17, 42, 5, 9, 33, 71], [1, 60, 3], [1, 88, 14, 14, 27]]


def _hf_generate(hf, ids, mask, n, eos, penalty=1.0):
  with torch.no_grad():
    out = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                      do_sample=False, max_new_tokens=n, min_new_tokens=0,
                      repetition_penalty=penalty, eos_token_id=eos, pad_token_id=PAD)
  out = out[:, ids.shape[1]:].numpy()
  return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=PAD)  # all stopped early


def test_greedy_left_padded_batch_matches_transformers_with_eos(tiny):
  module, params, hf, _ = tiny
  ids, mask = _left_padded(PROMPTS)
  n = 12
  free = gen.generate(module, params, input_ids=ids, attention_mask=mask, max_new_tokens=n,
                      eos_id=None, pad_id=PAD)
  free_tokens = np.asarray(free.tokens)
  np.testing.assert_array_equal(free.lengths, [n] * len(PROMPTS))
  np.testing.assert_array_equal(free_tokens, _hf_generate(hf, ids, mask, n, eos=[]))
  # An EOS that row 0 emits at step 4: row 0 stops there, the others where they emit it.
  eos = int(free_tokens[0, 4])
  out = gen.generate(module, params, input_ids=ids, attention_mask=mask, max_new_tokens=n,
                     eos_id=eos, pad_id=PAD)
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(tokens, _hf_generate(hf, ids, mask, n, eos=eos))
  first = int(np.argmax(free_tokens[0] == eos))
  assert int(out.lengths[0]) == first + 1 <= 5
  assert (tokens[0, first + 1:] == PAD).all() and tokens[0, first] == eos
  for r in range(len(PROMPTS)):
    hit = np.flatnonzero(free_tokens[r] == eos)
    length = hit[0] + 1 if hit.size else n
    assert int(out.lengths[r]) == length
    np.testing.assert_array_equal(tokens[r, :length], free_tokens[r, :length])


def test_repetition_penalty_matches_transformers(tiny):
  module, params, hf, _ = tiny
  ids, mask = _left_padded(PROMPTS)
  n = 12
  out = gen.generate(module, params, input_ids=ids, attention_mask=mask, max_new_tokens=n,
                     eos_id=None, pad_id=PAD, repetition_penalty=1.5)
  ref = _hf_generate(hf, ids, mask, n, eos=[], penalty=1.5)
  np.testing.assert_array_equal(out.tokens, ref)
  plain = _hf_generate(hf, ids, mask, n, eos=[])
  assert (ref != plain).any()  # the penalty really changed something


def test_opt_greedy_and_penalty_match_transformers(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.OPTConfig(
      vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
      max_position_embeddings=64, word_embed_proj_dim=32, init_std=0.3, pad_token_id=PAD,
      bos_token_id=1, eos_token_id=2)
  hf = transformers.OPTForCausalLM(cfg).eval()
  hf.save_pretrained(tmp_path)
  config, source, _ = llm_weights.read_config(tmp_path)
  module = llm_weights.llm_models.make_decoder(config)
  params = llm_weights.load_params(module, config, source)
  ids, mask = _left_padded(PROMPTS)
  for penalty in (1.0, 1.5):
    out = gen.generate(module, params, input_ids=ids, attention_mask=mask, max_new_tokens=12,
                       eos_id=None, pad_id=PAD, repetition_penalty=penalty)
    np.testing.assert_array_equal(out.tokens, _hf_generate(hf, ids, mask, 12, eos=[],
                                                           penalty=penalty))


def test_inputs_embeds_prompt_equals_ids_prompt(tiny):
  module, params, _, _ = tiny
  ids, mask = _left_padded(PROMPTS)
  embeds = module.apply({"params": params}, jnp.asarray(ids), method=module.embed)
  a = gen.generate(module, params, input_ids=ids, attention_mask=mask, max_new_tokens=12,
                   eos_id=None, pad_id=PAD)
  b = gen.generate(module, {"params": params}, inputs_embeds=embeds, attention_mask=mask,
                   max_new_tokens=12, eos_id=None, pad_id=PAD)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_right_padded_prompt_is_left_aligned(tiny):
  module, params, _, _ = tiny
  ids, mask = _left_padded(PROMPTS)
  rids, rmask = np.zeros_like(ids), np.zeros_like(mask)
  for i, r in enumerate(PROMPTS):
    rids[i, :len(r)] = r
    rmask[i, :len(r)] = 1
  a = gen.generate(module, params, input_ids=ids, attention_mask=mask, max_new_tokens=12,
                   eos_id=None, pad_id=PAD)
  b = gen.generate(module, params, input_ids=rids, attention_mask=rmask, max_new_tokens=12,
                   eos_id=None, pad_id=PAD)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_sampling(tiny):
  module, params, _, _ = tiny
  ids, mask = _left_padded(PROMPTS)
  kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_id=None, pad_id=PAD)
  greedy = np.asarray(gen.generate(module, params, **kw).tokens)
  # A nucleus this small keeps only the argmax token: sampling == greedy.
  nucleus = gen.generate(module, params, temperature=1.0, top_p=1e-6,
                         rng=jax.random.PRNGKey(3), **kw)
  np.testing.assert_array_equal(nucleus.tokens, greedy)
  s1 = np.asarray(gen.generate(module, params, temperature=2.0, rng=jax.random.PRNGKey(1),
                               **kw).tokens)
  s1b = np.asarray(gen.generate(module, params, temperature=2.0, rng=jax.random.PRNGKey(1),
                                **kw).tokens)
  s2 = np.asarray(gen.generate(module, params, temperature=2.0, rng=jax.random.PRNGKey(2),
                               **kw).tokens)
  np.testing.assert_array_equal(s1, s1b)
  assert (s1 != s2).any() and (s1 != greedy).any()
  assert ((s1 >= 0) & (s1 < 96)).all()


def test_logits_processors_match_transformers():
  from transformers.generation import logits_process as lp  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  logits = rng.randn(4, 50).astype(np.float32) * 3
  seen_ids = rng.randint(0, 50, (4, 7))
  seen = np.zeros((4, 50), bool)
  np.put_along_axis(seen, seen_ids, True, axis=1)
  ours = gen.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.5)
  ref = lp.RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor(seen_ids), torch.tensor(logits))
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
  for top_p in (0.3, 0.8, 0.95):
    ours = np.asarray(gen.top_p_filter(jnp.asarray(logits), top_p))
    ref = lp.TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_array_equal(ours[~np.isinf(ours)], ref[~np.isinf(ref)])


CONTS = [[[5, 6, 7], [40], [9, 9, 9, 9], [70, 2]],
         [[11, 12], [13, 14, 15, 16], [17], [18, 19, 20]],
         [[21], [22, 23], [24, 25, 26], [27, 28, 29, 30]]]


def _conts(conts):
  b, c, t = len(conts), len(conts[0]), max(len(x) for row in conts for x in row)
  ids = np.full((b, c, t), PAD, np.int32)
  mask = np.zeros((b, c, t), np.int32)
  for i, row in enumerate(conts):
    for j, x in enumerate(row):
      ids[i, j, :len(x)] = x
      mask[i, j, :len(x)] = 1
  return ids, mask


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _full_forward_logprobs(apply_fn, pairs):
  """sum_j log p(cont[j] | prompt + cont[:j]) for each (prompt, cont), from one right-padded
  forward pass of all prompt + cont sequences (no cache)."""
  width = max(len(p) + len(c) for p, c in pairs)
  seqs = np.zeros((len(pairs), width), np.int32)
  mask = np.zeros((len(pairs), width), np.int32)
  for i, (p, c) in enumerate(pairs):
    seqs[i, :len(p) + len(c)] = p + c
    mask[i, :len(p) + len(c)] = 1
  logp = _log_softmax(apply_fn(seqs, mask))
  return np.array([sum(logp[i, len(p) - 1 + j, tok] for j, tok in enumerate(c))
                   for i, (p, c) in enumerate(pairs)])


def test_score_continuations_matches_full_forward_and_transformers(tiny):
  module, params, hf, _ = tiny
  ids, mask = _left_padded(PROMPTS)
  cids, cmask = _conts(CONTS)
  total, count = scoring.score_continuations(module, params, prompt_ids=ids, prompt_mask=mask,
                                         cont_ids=cids, cont_mask=cmask)
  assert total.shape == (3, 4) and total.dtype == jnp.float32
  np.testing.assert_array_equal(count, cmask.sum(-1))

  @jax.jit
  def ours(seq, m):
    return module.apply({"params": params}, input_ids=seq, attention_mask=m)[0]

  def theirs(seq, m):
    with torch.no_grad():
      return hf(torch.tensor(seq, dtype=torch.long), attention_mask=torch.tensor(m)).logits.numpy()

  pairs = [(p, c) for p, row in zip(PROMPTS, CONTS) for c in row]
  flat = np.asarray(total).reshape(-1)
  np.testing.assert_allclose(flat, _full_forward_logprobs(ours, pairs), atol=1e-4, rtol=0)
  np.testing.assert_allclose(flat, _full_forward_logprobs(theirs, pairs), atol=1e-4, rtol=0)
  # Two passes of 3 continuations (the second padded) give the same scores.
  total_k, count_k = scoring.score_continuations(module, params, prompt_ids=ids, prompt_mask=mask,
                                             cont_ids=cids, cont_mask=cmask,
                                             candidates_per_pass=3)
  np.testing.assert_allclose(total_k, total, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(count_k, count)
  # Soft-prompt path: the same prompt as embeddings scores the same.
  embeds = module.apply({"params": params}, jnp.asarray(ids), method=module.embed)
  total_e, _ = scoring.score_continuations(module, params, prompt_embeds=embeds, prompt_mask=mask,
                                       cont_ids=cids, cont_mask=cmask)
  np.testing.assert_allclose(total_e, total, atol=1e-5, rtol=0)


@pytest.mark.parametrize("new_tokens,per_pass,packed", [(5, None, None), (40, None, None),
                                                         (5, 3, None), (5, None, "fit")])
def test_rank_and_generate_equals_the_two_separately(tiny, new_tokens, per_pass, packed):
  """One prefill for both: the same scores as score_continuations and the same tokens as
  generate, whether the decode window is narrower or wider than the packed continuations."""
  module, params, _, _ = tiny
  ids, mask = _left_padded(PROMPTS)
  cids, cmask = _conts(CONTS)
  eos, options = gen.generation_options(None, repetition_penalty=1.5)
  fn = jax.jit(scoring.rank_and_generate_fn, static_argnums=(0,),
               static_argnames=("max_new_tokens", "pad_id", "candidates_per_pass",
                                "packed_len"))
  total, count, out = fn(module, params, jnp.asarray(ids), None, jnp.asarray(mask),
                         jnp.asarray(cids), jnp.asarray(cmask), eos, options,
                         jax.random.PRNGKey(0), max_new_tokens=new_tokens, pad_id=PAD,
                         candidates_per_pass=per_pass,
                         packed_len=scoring.packed_length(cmask, per_pass, 1) if packed else None)
  ref_total, ref_count = scoring.score_continuations(module, params, prompt_ids=ids,
                                                 prompt_mask=mask, cont_ids=cids,
                                                 cont_mask=cmask)
  ref = gen.generate(module, params, input_ids=ids, attention_mask=mask,
                     max_new_tokens=new_tokens, eos_id=None, pad_id=PAD,
                     repetition_penalty=1.5, prompt_bucket=0)
  # Totals of ~40 nats: float32 rounding of the two programs' summation orders (1 ulp of
  # 40 is 4e-6) is the tolerance.
  np.testing.assert_allclose(total, ref_total, atol=1e-5, rtol=1e-6)
  np.testing.assert_array_equal(count, ref_count)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, ref.lengths)


def test_packed_length():
  m = np.zeros((2, 3, 4), np.int32)
  m[0, :, :3] = 1                                   # row 0: 9 tokens
  m[1, 0, :4] = 1                                   # row 1: 4 tokens
  assert scoring.packed_length(m, multiple=8) == 16
  assert scoring.packed_length(m, candidates_per_pass=1, multiple=1) == 4
  assert scoring.packed_length(m, candidates_per_pass=2, multiple=1) == 6


def test_explicit_attention_pattern_needs_positions(tiny):
  module, params, _, _ = tiny
  ids, _ = _left_padded(PROMPTS)
  pattern = np.tril(np.ones((ids.shape[1], ids.shape[1]), bool))[None].repeat(3, 0)
  with pytest.raises(ValueError, match="needs explicit positions"):
    module.apply({"params": params}, input_ids=ids, attention_mask=pattern)
  pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  with pytest.raises(ValueError, match=r"explicit \[B, T, S\] pattern"):
    module.apply({"params": params}, input_ids=ids, attention_mask=pattern[:, 1:],
                 positions=pos)
  # A plain causal pattern with explicit positions = the default causal mask.
  full = np.ones_like(ids)
  a = module.apply({"params": params}, input_ids=ids, attention_mask=pattern, positions=pos)[0]
  b = module.apply({"params": params}, input_ids=ids, attention_mask=full)[0]
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_params_give_the_same_results(tiny):
  from allmrec_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  module, params, _, path = tiny
  mesh = shd.make_mesh((2, 2, 2))
  config, source, _ = llm_weights.read_config(path)
  sharded = llm_weights.load_params(module, config, source, mesh, None)
  assert max(shd.num_shards(x) for x in jax.tree.leaves(sharded)) > 1  # really split
  ids, mask = _left_padded(PROMPTS)
  cids, cmask = _conts(CONTS)
  kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_id=None, pad_id=PAD)
  ref = gen.generate(module, params, **kw)
  ref_score, _ = scoring.score_continuations(module, params, prompt_ids=ids, prompt_mask=mask,
                                         cont_ids=cids, cont_mask=cmask)
  with shd.activate(mesh):
    out = gen.generate(module, sharded, **kw)
    score, _ = scoring.score_continuations(module, sharded, prompt_ids=ids, prompt_mask=mask,
                                       cont_ids=cids, cont_mask=cmask)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(score, ref_score, atol=1e-4, rtol=0)


def test_bad_inputs_raise(tiny):
  module, params, _, _ = tiny
  ids, mask = _left_padded(PROMPTS)
  with pytest.raises(ValueError, match="exactly one of input_ids"):
    gen.generate(module, params, attention_mask=mask, max_new_tokens=2, eos_id=None, pad_id=0)
  with pytest.raises(ValueError, match="attention_mask shape"):
    gen.generate(module, params, input_ids=ids, attention_mask=mask[:, 1:], max_new_tokens=2,
                 eos_id=None, pad_id=0)
  with pytest.raises(ValueError, match="needs rng"):
    gen.generate(module, params, input_ids=ids, attention_mask=mask, max_new_tokens=2,
                 eos_id=None, pad_id=0, temperature=1.0)
  cids, cmask = _conts(CONTS)
  with pytest.raises(ValueError, match="must both be"):
    scoring.score_continuations(module, params, prompt_ids=ids, prompt_mask=mask,
                            cont_ids=cids[:, 0], cont_mask=cmask[:, 0])


def test_bucket_length():
  assert gen.bucket_length(1) == 64
  assert gen.bucket_length(64) == 64
  assert gen.bucket_length(65) == 128
  assert gen.bucket_length(300) == 320


# ---------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32 by both sides).

REAL_PROMPTS = [
    "The capital of France is",
    "Here is a short list of classic science fiction movies:",
    "Q: What is the largest planet in the solar system?\nA:",
    "Once upon a time",
]


def _hf_from_gguf(path, c):
  """transformers' LlamaForCausalLM with the GGUF tensors as transformers dequantises them
  (`from_pretrained(gguf_file=...)` needs `accelerate`, which is not a dependency)."""
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=import-outside-toplevel
  hf_config = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
      rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
      tie_word_embeddings=c.tie_word_embeddings)
  with torch.device("meta"):
    meta = transformers.LlamaForCausalLM(hf_config)
  parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model.tie_weights()
  return model


@pytest.fixture(scope="module")
def smollm():
  from allmrec_jax import assets  # pylint: disable=import-outside-toplevel
  path = assets.get_asset("smollm2-135m")
  loaded = llm_weights.load_llm(path)
  hf = _hf_from_gguf(path, loaded.config)
  tok = loaded.tokenizer
  tok.padding_side = "left"
  batch = tok(REAL_PROMPTS, padding=True, return_tensors="np")
  return loaded, hf, batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


@pytest.mark.slow
def test_smollm_greedy_and_penalty_match_transformers(smollm):
  loaded, hf, ids, mask = smollm
  assert (mask == 0).any()  # a really left-padded batch
  eos, pad = loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id
  for penalty in (1.0, 1.5):
    out = gen.generate(loaded.module, loaded.params, input_ids=ids, attention_mask=mask,
                       max_new_tokens=16, eos_id=eos, pad_id=pad, repetition_penalty=penalty)
    with torch.no_grad():
      ref = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        do_sample=False, max_new_tokens=16, repetition_penalty=penalty,
                        eos_token_id=eos, pad_token_id=pad)
    ref = ref[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, 16 - ref.shape[1])), constant_values=pad)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref, err_msg=f"penalty={penalty}")


@pytest.mark.slow
def test_smollm_score_continuations_matches_transformers(smollm):
  loaded, hf, ids, mask = smollm
  tok = loaded.tokenizer
  titles = [" Paris.", " Berlin, the capital of Germany.", " a city"]
  conts = [[tok(t)["input_ids"] for t in titles]] * ids.shape[0]
  cids, cmask = _conts(conts)
  total, count = scoring.score_continuations(loaded.module, loaded.params, prompt_ids=ids,
                                         prompt_mask=mask, cont_ids=cids, cont_mask=cmask)

  def theirs(seq, m):
    with torch.no_grad():
      return hf(torch.tensor(seq, dtype=torch.long), attention_mask=torch.tensor(m)).logits.numpy()

  prompts = [[int(x) for x, m in zip(ids[i], mask[i]) if m] for i in (0, 1)]
  pairs = [(p, c) for i, p in enumerate(prompts) for c in conts[i]]
  np.testing.assert_array_equal(count, [[len(c) for c in row] for row in conts])
  flat = np.asarray(total[:2]).reshape(-1)
  # (the cache-free forward of our own module is compared in the tiny test above)
  np.testing.assert_allclose(flat, _full_forward_logprobs(theirs, pairs), atol=1e-4, rtol=0)
  assert np.argmax(np.asarray(total[0]) / np.asarray(count[0])) == 0  # " Paris."


# ---------------------------------------------------------------------------------------
# The launcher, end to end on a tiny random model that carries a real tokenizer.


@pytest.mark.slow
def test_launch_generate_prints_the_continuation(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  from allmrec_jax import assets  # pylint: disable=import-outside-toplevel
  gguf = assets.get_asset("smollm2-135m")
  tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  torch.manual_seed(1)
  cfg = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5,
      tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.save_pretrained(tmp_path)
  tok.save_pretrained(tmp_path)
  prompt = "The capital of France is"
  ids = torch.tensor([tok(prompt)["input_ids"]])
  with torch.no_grad():
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=6, repetition_penalty=1.5,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
  assert expected.strip()  # a real continuation, not an immediate EOS
  root = pathlib.Path(__file__).resolve().parents[2]
  proc = subprocess.run(
      [sys.executable, str(root / "launch" / "generate.py"), f"--llm={tmp_path}",
       f"--prompt={prompt}", "--max_new_tokens=6", "--repetition_penalty=1.5"],
      capture_output=True, text=True, timeout=300, cwd=root,
      env=testing.one_device_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.rstrip("\n") == expected
  bad = subprocess.run([sys.executable, str(root / "launch" / "generate.py"),
                        f"--batch={tmp_path / 'none.txt'}"],
                       capture_output=True, text=True, timeout=120, cwd=root)
  assert bad.returncode != 0 and "none.txt: no such file" in bad.stderr
