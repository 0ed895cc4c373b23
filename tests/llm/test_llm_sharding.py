"""Decoders on 8 fake CPU devices: same logits (1e-4) under several meshes as on one device,
with the parameters really split. Run with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from allmrec_jax import sharding as shd
from allmrec_jax.models.llm import LlamaConfig, LlamaDecoder, OPTConfig, OPTDecoder, init_cache
from allmrec_jax.weights import hf as hf_lib
from allmrec_jax.weights import llm as llm_lib

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


@pytest.fixture(scope="module")
def llama():
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
      tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  config = LlamaConfig.from_hf(hf_config)
  state = hf_lib.DictSource(model.state_dict())
  module = LlamaDecoder(config)
  single = llm_lib.load_params(module, config, state)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 128, (8, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1::2, :3] = 0  # left padding in every other row
  ref, _ = jax.jit(module.apply)({"params": single}, input_ids=ids, attention_mask=mask)
  return module, config, state, ids, mask, np.asarray(ref)


def _forward(module, params, mesh, ids, mask):
  with shd.activate(mesh):
    ids_s = jax.device_put(ids, shd.batch_sharding(mesh, 2))
    mask_s = jax.device_put(mask, shd.batch_sharding(mesh, 2))
    logits, _ = jax.jit(module.apply)({"params": params}, input_ids=ids_s, attention_mask=mask_s)
  return np.asarray(logits)


@pytest.mark.parametrize("shape", MESHES)
def test_llama_sharded_load_same_logits(llama, shape):
  module, config, state, ids, mask, ref = llama
  mesh = shd.make_mesh(shape)
  params = llm_lib.load_params(module, config, state, mesh=mesh)
  emb = params["embed"]["embedding"]
  q = params["layers_0"]["attn"]["q"]["kernel"]
  if shape[1] > 1 or shape[2] > 1:  # fsdp / tensor axes split the weights
    assert shd.num_shards(emb) == shape[1] * shape[2]
    assert shd.num_shards(q) == shape[1] * shape[2]
    assert emb.addressable_shards[0].data.shape[0] * shape[2] == emb.shape[0]
  else:  # pure data parallel: replicated parameters
    assert shd.num_shards(emb) == 1
  logits = _forward(module, params, mesh, ids, mask)
  diff = float(np.max(np.abs((logits - ref) * mask[..., None])))
  assert diff < 1e-4, (shape, diff)


def test_llama_sharded_cache_step(llama):
  """One prefill + decode step with a cache sharded along the batch on a (2,2,2) mesh."""
  module, config, state, ids, mask, ref = llama
  mesh = shd.make_mesh((2, 2, 2))
  params = llm_lib.load_params(module, config, state, mesh=mesh)
  cache = init_cache(config, 8, 16)
  cmask = np.zeros((8, 16), np.int32)
  cmask[:, :12] = mask
  with shd.activate(mesh):
    step = jax.jit(lambda p, i, c: module.apply({"params": p}, input_ids=i, attention_mask=cmask,
                                                cache=c))
    logits, aux = step(params, ids[:, :11], cache)
    last, aux = step(params, ids[:, 11:], aux["cache"])
  np.testing.assert_allclose(np.asarray(last[:, 0]), ref[:, 11], atol=1e-4)
  assert int(aux["cache"]["end"]) == 12


def test_indivisible_dims_fall_back_to_replication():
  """A 9-head model (like SmolLM2) on a 2-way tensor axis replicates the head axis instead of
  failing, and still gives the single-device logits."""
  torch.manual_seed(2)
  hf_config = transformers.LlamaConfig(
      vocab_size=96, hidden_size=72, intermediate_size=96, num_hidden_layers=1,
      num_attention_heads=9, num_key_value_heads=3, head_dim=8)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  config = LlamaConfig.from_hf(hf_config)
  module = LlamaDecoder(config)
  mesh = shd.make_mesh((2, 2, 2))
  shardings = llm_lib.param_shardings(llm_lib.abstract_params(module, config), mesh, None)
  assert tuple(shardings["layers_0"]["attn"]["q"]["kernel"].spec)[:2] == ("fsdp", None)
  assert tuple(shardings["embed"]["embedding"].spec) == ("tensor", "fsdp")  # 96, 72: kept
  state = hf_lib.DictSource(model.state_dict())
  ids = np.random.RandomState(0).randint(0, 96, (4, 7)).astype(np.int32)
  ref, _ = module.apply({"params": llm_lib.load_params(module, config, state)}, input_ids=ids)
  params = llm_lib.load_params(module, config, state, mesh=mesh)
  logits = _forward(module, params, mesh, ids, np.ones_like(ids))
  assert float(np.max(np.abs(logits - np.asarray(ref)))) < 1e-4


def test_opt_sharded_same_logits():
  torch.manual_seed(1)
  hf_config = transformers.OPTConfig(
      vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=8,
      max_position_embeddings=32, word_embed_proj_dim=32, do_layer_norm_before=False)
  model = transformers.OPTForCausalLM(hf_config).eval()
  config = OPTConfig.from_hf(hf_config)
  module = OPTDecoder(config)
  state = hf_lib.DictSource(model.state_dict())
  ids = np.random.RandomState(2).randint(3, 128, (8, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  ref, _ = jax.jit(module.apply)({"params": llm_lib.load_params(module, config, state)},
                                 input_ids=ids, attention_mask=mask)
  mesh = shd.make_mesh((2, 2, 2))
  params = llm_lib.load_params(module, config, state, mesh=mesh)
  assert shd.num_shards(params["layers_0"]["mlp"]["fc1"]["kernel"]) == 4
  logits = _forward(module, params, mesh, ids, mask)
  assert float(np.max(np.abs(logits - np.asarray(ref)))) < 1e-4
