"""Fixtures of the stage-1 tests: a tiny dataset, a tiny SBERT directory, a random CF model."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax import assets
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.models import cf as cf_lib
from configs import base

NUM_ITEMS = 130
NUM_USERS = 14
MAXLEN = 8
WORDS = ["Star", "Wars", "Toy", "Story", "Heat", "Casino", "Fargo", "Babe", "Alien", "Dune",
         "Night", "City", "Love", "War", "Blue", "Red", "Dead", "Man", "Lost", "Home"]


def make_dataset(seed: int = 0) -> dataset_lib.RecDataset:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, 12, size=NUM_USERS)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  items = np.concatenate([rng.choice(np.arange(1, NUM_ITEMS + 1), size=n, replace=False)
                          for n in lengths])
  titles = [""] + [f"{' '.join(rng.choice(WORDS, size=rng.integers(1, 5)))} "
                   f"({1950 + i % 50})" for i in range(1, NUM_ITEMS + 1)]
  descriptions = [""] + [("a film about " + " ".join(rng.choice(WORDS, size=6)))
                         if i % 3 == 0 else "" for i in range(1, NUM_ITEMS + 1)]
  return dataset_lib.build_dataset(
      name="tiny", domain="movies", seq_offsets=offsets, seq_items=items,
      num_items=NUM_ITEMS, titles=titles, descriptions=descriptions,
      genres=[[] for _ in range(NUM_ITEMS + 1)], candidate_seed=3)


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


@pytest.fixture(scope="session")
def tiny_dataset():
  return make_dataset()


@pytest.fixture(scope="session")
def tiny_sbert_dir(tmp_path_factory):
  return write_tiny_sbert(tmp_path_factory.mktemp("tiny_sbert"))


def make_config(sbert_dir, **stage1):
  c = base.get_base_config()
  c.data.maxlen = MAXLEN
  c.cf.hidden_dim = 12
  c.cf.num_blocks = 1
  c.sbert.path = str(sbert_dir)
  c.sbert.max_len = 24
  c.stage1.batch_size = 4
  c.stage1.num_epochs = 2
  c.stage1.latent_dim = 8
  c.stage1.eval_batch_size = 32
  for k, v in stage1.items():
    c.stage1[k] = v
  return c


def make_cf(config, num_items, model_name="sasrec", seed=0):
  cf = dict(config.cf)
  cf["model"] = model_name
  cf["maxlen"] = config.data.maxlen
  model = cf_lib.make_cf_model(cf, num_items)
  seq = jnp.ones((1, config.data.maxlen), jnp.int32)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = nn.unbox(model.init(jax.random.key(seed), seq, seq, seq))
  return model, params
