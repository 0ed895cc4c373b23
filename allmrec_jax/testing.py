"""Tiny random models in the real on-disk formats, for tests and the kill-and-resume harness.

They use the real tokenizers of the asset cache (SmolLM2's, MiniLM's), so prompts, data and
loaders are exercised exactly as with the embedded models; only the weights are small and
random. Written with numpy and safetensors (no torch import).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np

from allmrec_jax import assets
from allmrec_jax.weights import llm as llm_weights


def one_device_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """A copy of `env` (default os.environ) for a CPU subprocess with one device: the
  fake-device count is taken out of XLA_FLAGS, any other XLA flag is kept."""
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def write_tiny_llama(path: pathlib.Path, hidden: int = 16, inter: int = 32,
                     layers: int = 1, heads: int = 2, kv_heads: int = 1) -> pathlib.Path:
  """A tiny random Llama as a Hugging Face folder (config.json, model.safetensors) with the
  real SmolLM2 tokenizer of the asset cache; written with numpy (no torch import)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  gguf = assets.get_asset("smollm2-135m")
  tok = llm_weights._load_tokenizer(gguf.parent, gguf.name)  # pylint: disable=protected-access
  path.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  head_dim = hidden // heads

  def w(*shape):
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)

  t = {"model.embed_tokens.weight": w(len(tok), hidden),
       "model.norm.weight": np.ones(hidden, np.float32)}
  for i in range(layers):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
    t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
    t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
    t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
    t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
    t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
    t[p + "mlp.up_proj.weight"] = w(inter, hidden)
    t[p + "mlp.down_proj.weight"] = w(hidden, inter)
  save_file(t, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps({
      "model_type": "llama", "architectures": ["LlamaForCausalLM"],
      "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": inter,
      "num_hidden_layers": layers, "num_attention_heads": heads,
      "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
      "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
      "tie_word_embeddings": True, "bos_token_id": tok.bos_token_id,
      "eos_token_id": tok.eos_token_id}))
  tok.save_pretrained(str(path))
  return path


def write_tiny_sbert(path: pathlib.Path, hidden: int = 16, layers: int = 2,
                     inter: int = 32) -> pathlib.Path:
  """A sentence-transformers folder: a tiny random BERT (HF tensor names, safetensors) and
  the real MiniLM tokenizer files."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  src = assets.get_asset("all-minilm-l6-v2")
  path.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)

  def w(*shape):
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)

  t = {"embeddings.word_embeddings.weight": w(30522, hidden),
       "embeddings.position_embeddings.weight": w(64, hidden),
       "embeddings.token_type_embeddings.weight": w(2, hidden),
       "embeddings.LayerNorm.weight": 1 + w(hidden), "embeddings.LayerNorm.bias": w(hidden)}
  for i in range(layers):
    p = f"encoder.layer.{i}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      t[p + name + ".weight"] = w(hidden, hidden)
      t[p + name + ".bias"] = w(hidden)
    t[p + "intermediate.dense.weight"] = w(inter, hidden)
    t[p + "intermediate.dense.bias"] = w(inter)
    t[p + "output.dense.weight"] = w(hidden, inter)
    t[p + "output.dense.bias"] = w(hidden)
    for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[p + ln + ".weight"] = 1 + w(hidden)
      t[p + ln + ".bias"] = w(hidden)
  save_file(t, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps({
      "model_type": "bert", "vocab_size": 30522, "hidden_size": hidden,
      "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": inter,
      "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu",
      "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
      "attention_probs_dropout_prob": 0.1}))
  for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "modules.json", "sentence_bert_config.json"):
    if (src / f).exists():
      shutil.copy(src / f, path / f)
  (path / "1_Pooling").mkdir(exist_ok=True)
  (path / "1_Pooling" / "config.json").write_text(json.dumps(
      {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}))
  return path
