"""SBERT (BertEncoder + sentence-transformers pooling) against sentence-transformers on CPU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax import assets
from allmrec_jax import common_types as ct
from allmrec_jax import sharding as shd
from allmrec_jax.models.text import bert
from allmrec_jax.weights import sbert

TITLES = [
    "Toy Story (1995)",
    "GoldenEye (1995), James Bond faces a rogue agent who plans to use a space-based weapon",
    "Four Rooms (1995)",
    "Get Shorty (1995)",
    "Copycat (1995), A criminal psychologist and a detective hunt a serial killer",
    "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)",
    "Twelve Monkeys (1995)",
    "Babe (1995)",
]


@pytest.fixture(scope="module")
def loaded():
  return sbert.load_sbert(assets.get_asset("all-minilm-l6-v2"))


@pytest.fixture(scope="module")
def st_model():
  st = pytest.importorskip("sentence_transformers")
  return st.SentenceTransformer(str(assets.get_asset("all-minilm-l6-v2")), device="cpu")


@pytest.fixture(scope="module")
def reference(st_model):
  return st_model.encode(TITLES, convert_to_numpy=True, batch_size=len(TITLES))


def test_pooling_info_from_modules_json(loaded):
  _, _, _, info = loaded
  assert info["pooling"] == "mean"
  assert info["normalize"] is True
  assert info["dim"] == 384


def test_normalize_false_is_the_pipeline_without_its_normalize_module(loaded, st_model):
  st = pytest.importorskip("sentence_transformers")
  kinds = [type(m).__name__ for m in st_model]
  assert kinds == ["Transformer", "Pooling", "Normalize"], kinds
  no_norm = st.SentenceTransformer(modules=[st_model[0], st_model[1]], device="cpu")
  want = no_norm.encode(TITLES, convert_to_numpy=True, batch_size=len(TITLES))
  module, params, tokenizer, info = sbert.load_sbert(assets.get_asset("all-minilm-l6-v2"),
                                                     normalize="false")
  assert info["normalize"] is False and info["normalize_in_model"] is True
  ids, mask = sbert.tokenize_texts(tokenizer, TITLES, max_len=48)
  raw = np.asarray(module.apply({"params": params}, ids, mask)[0])
  np.testing.assert_allclose(raw, want, atol=1e-5, rtol=0)
  norms = np.linalg.norm(raw, axis=-1)
  assert (np.abs(norms - 1) > 0.5).all(), norms  # really unnormalised (MiniLM: norms ~3-8)
  # Same parameters: the "auto" output is exactly the raw one over its norm.
  auto = np.asarray(loaded.module.apply({"params": loaded.params}, ids, mask)[0])
  np.testing.assert_allclose(auto, raw / norms[:, None], atol=1e-6, rtol=0)


def test_normalize_setting_resolution():
  assert sbert.resolve_normalize("auto", True) is True
  assert sbert.resolve_normalize("auto", False) is False
  assert sbert.resolve_normalize(None, True) is True
  assert sbert.resolve_normalize("false", True) is False
  assert sbert.resolve_normalize("False", True) is False
  assert sbert.resolve_normalize("true", False) is True
  assert sbert.resolve_normalize(False, True) is False
  with pytest.raises(ValueError, match="config.sbert.normalize"):
    sbert.resolve_normalize("yes", True)


def test_padded_batch_matches_sentence_transformers(loaded, reference):
  module, params, tokenizer, _ = loaded
  ids, mask = sbert.tokenize_texts(tokenizer, TITLES, max_len=48)
  assert (mask.sum(1) < 48).all() and len(set(mask.sum(1))) > 1  # really padded, ragged
  out, aux = jax.jit(module.apply)({"params": params}, ids, mask)
  out = np.asarray(out)
  assert out.shape == (len(TITLES), 384)
  np.testing.assert_allclose(out, reference, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  assert aux["hidden"].shape == (len(TITLES), 48, 384)


def test_padding_does_not_change_embedding(loaded):
  module, params, tokenizer, _ = loaded
  apply = jax.jit(module.apply)
  ids_a, mask_a = sbert.tokenize_texts(tokenizer, TITLES[:1], max_len=8)
  ids_b, mask_b = sbert.tokenize_texts(tokenizer, TITLES, max_len=64)
  alone, _ = apply({"params": params}, ids_a, mask_a)
  in_batch, _ = apply({"params": params}, ids_b, mask_b)
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(in_batch[0]), atol=1e-6)
  # Garbage in the padded positions is masked out entirely.
  noisy = np.where(mask_b == 1, ids_b, 1234).astype(np.int32)
  out_noisy, _ = apply({"params": params}, noisy, mask_b)
  np.testing.assert_allclose(np.asarray(out_noisy), np.asarray(in_batch), atol=1e-6)


def test_empty_text_row_pools_to_zero(loaded):
  module, params, tokenizer, _ = loaded
  ids, mask = sbert.tokenize_texts(tokenizer, ["", "Babe (1995)"], max_len=16)
  assert not mask[0].any() and not ids[0].any()
  out, _ = module.apply({"params": params}, ids, mask)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)


def test_dropout_only_when_not_deterministic():
  cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=32, max_position_embeddings=16,
                        hidden_dropout=0.3, attention_dropout=0.3)
  module = bert.BertEncoder(cfg)
  ids = jnp.array([[2, 5, 7, 3, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  variables = module.init(jax.random.key(0), ids, mask)
  det1, _ = module.apply(variables, ids, mask)
  det2, _ = module.apply(variables, ids, mask, deterministic=True)
  np.testing.assert_array_equal(det1, det2)
  d1, _ = module.apply(variables, ids, mask, deterministic=False,
                       rngs={"dropout": jax.random.key(1)})
  d1b, _ = module.apply(variables, ids, mask, deterministic=False,
                        rngs={"dropout": jax.random.key(1)})
  d2, _ = module.apply(variables, ids, mask, deterministic=False,
                       rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(d1, d1b)
  assert np.abs(np.asarray(d1 - det1)).max() > 1e-3
  assert np.abs(np.asarray(d1 - d2)).max() > 1e-3


def test_parameters_carry_logical_axes():
  cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
  ids = jnp.ones((1, 4), jnp.int32)
  boxed = bert.BertEncoder(cfg).init(jax.random.key(0), ids, ids)["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["word"]["embedding"]) == (ct.VOCAB, ct.EMBED)
  assert tuple(specs["layer_0"]["query"]["kernel"]) == (ct.EMBED, ct.HEADS)
  assert tuple(specs["layer_0"]["intermediate"]["kernel"]) == (ct.EMBED, ct.MLP)
  assert tuple(specs["layer_0"]["output"]["kernel"]) == (ct.MLP, ct.EMBED)
  assert tuple(specs["layer_0"]["output_ln"]["scale"]) == (ct.NORM,)


def test_sharded_load_matches_single_device(loaded):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  module, params, tokenizer, _ = loaded
  mesh = shd.make_mesh((1, 2, 4))
  sharded = sbert.load_sbert(assets.get_asset("all-minilm-l6-v2"), mesh=mesh)
  assert shd.num_shards(sharded.params["layer_0"]["intermediate"]["kernel"]) == 8
  # 30522 vocab rows do not divide by 4: only the width is split there.
  assert shd.num_shards(sharded.params["word"]["embedding"]) == 2
  ids, mask = sbert.tokenize_texts(tokenizer, TITLES, max_len=32)
  with shd.activate(mesh):
    out_s, _ = jax.jit(sharded.module.apply)({"params": sharded.params}, ids, mask)
  out, _ = jax.jit(module.apply)({"params": params}, ids, mask)
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out), atol=1e-5)


def test_bad_config_is_named():
  with pytest.raises(ValueError, match="hidden_act"):
    bert.BertConfig.from_hf({"model_type": "bert", "hidden_act": "relu"})
  with pytest.raises(ValueError, match="pooling"):
    bert.BertConfig(pooling="max")


def test_packed_texts_give_the_same_embeddings(loaded, reference):
  module, params, tokenizer, _ = loaded
  texts = TITLES + ["", TITLES[0]]
  ids, mask = sbert.tokenize_texts(tokenizer, texts, max_len=32)
  packed = bert.pack_texts(ids, mask)
  assert packed["input_ids"].shape[0] < len(texts)            # really packed
  assert bert.pack_texts(ids, mask, rows=1) is None           # does not fit: None
  out, _ = jax.jit(module.apply, static_argnames=("num_texts",))(
      {"params": params}, packed["input_ids"], packed["attention_mask"],
      positions=packed["positions"], segment_ids=packed["segment_ids"],
      text_index=packed["text_index"], num_texts=len(texts))
  out = np.asarray(out)
  np.testing.assert_allclose(out[:len(TITLES)], reference, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out[len(TITLES)], 0.0)       # empty text
  np.testing.assert_allclose(out[-1], reference[0], atol=1e-5, rtol=0)


def test_bf16_matmuls_stay_close_to_sentence_transformers(reference):
  """sbert.matmul_dtype=bfloat16 (mixed precision): float32 parameters and output, the
  embeddings within bfloat16 rounding of the float32 reference (cosine > 0.999)."""
  module, params, tokenizer, _ = sbert.load_sbert(assets.get_asset("all-minilm-l6-v2"),
                                                  matmul_dtype="bfloat16")
  assert module.config.matmul_dtype == "bfloat16"
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  ids, mask = sbert.tokenize_texts(tokenizer, TITLES, max_len=48)
  out, _ = jax.jit(module.apply)({"params": params}, ids, mask)
  assert out.dtype == jnp.float32
  out = np.asarray(out)
  cos = np.sum(out * reference, -1)        # both unit-norm
  assert cos.min() > 0.999, cos
  assert np.abs(out - reference).max() > 1e-6     # really computed in lower precision
