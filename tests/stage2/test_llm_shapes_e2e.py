"""`configs/amazon.py` end to end on a generated Amazon-2018 category with every LLM shape
family: an OPT with project_in/project_out (word embeddings narrower than the hidden
width, OPT-350m's layout), an OPT without, and a Llama. CF -> stage 1 -> stage 2 ->
evaluation, tiny random weights saved as Hugging Face folders.

The soft tokens live in the input-embedding space (config.embed_dim), and the OPT prompt
starts with its `</s>` in the order `config.stage2.bos` names (the authors' order for the
projected OPT: [U], then `</s>`)."""

import gzip
import json
import pathlib
import shutil

import numpy as np
import pytest

from allmrec_jax import assets
from allmrec_jax import config_lib
from allmrec_jax import testing
from allmrec_jax.data import prepare
from allmrec_jax.trainers import runner
from allmrec_jax.trainers import stage2_run
from allmrec_jax.weights import llm as llm_weights
from configs import amazon

CATEGORY = "Movies_and_TV"


def _write_category(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """One Amazon-2018 category ({CATEGORY}.json.gz + meta_{CATEGORY}.json.gz): 40 users x
  7-10 reviews over 40 titled, described items (everything passes min_count 5)."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True)
  meta = [json.dumps({"asin": f"M{i}", "title": f"Film number {i}",
                      "description": [f"A film about topic {i % 7}"]}) for i in range(40)]
  reviews = []
  for u in range(40):
    items = rng.choice(40, size=int(rng.integers(7, 11)), replace=False)
    for t, i in enumerate(items):
      reviews.append(json.dumps({"reviewerID": f"U{u}", "asin": f"M{i}", "overall": 5.0,
                                 "unixReviewTime": 1000 + t}))
  for name, lines in ((f"{CATEGORY}.json.gz", reviews), (f"meta_{CATEGORY}.json.gz", meta)):
    with gzip.open(directory / name, "wt", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  return directory


def _opt_tokenizer():
  """A byte-level BPE tokenizer with OPT's special tokens (`</s>` = BOS = EOS, `<pad>`):
  SmolLM2's vocabulary from the asset cache (OPT's own is not offline)."""
  gguf = assets.get_asset("smollm2-135m")
  tok = llm_weights._load_tokenizer(gguf.parent, gguf.name)  # pylint: disable=protected-access
  tok.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
                          "unk_token": "<unk>"})
  return tok


def write_tiny_opt(path: pathlib.Path, word_embed_proj_dim: int, hidden: int = 32,
                   **kw) -> pathlib.Path:
  """A tiny random OPT saved by transformers' PyTorch OPTForCausalLM.save_pretrained,
  with an offline tokenizer."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  tok = _opt_tokenizer()
  cfg = transformers.OPTConfig(
      vocab_size=len(tok), hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=1024,
      word_embed_proj_dim=word_embed_proj_dim, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
  torch.manual_seed(0)
  transformers.OPTForCausalLM(cfg).eval().save_pretrained(str(path))
  tok.save_pretrained(str(path))
  return path


# name -> (folder writer, config.stage2.bos, the LLM's input-embedding width, hidden width)
LLMS = {
    "opt_project_in_out": (lambda p: write_tiny_opt(p, 16, do_layer_norm_before=False),
                           "after_user", 16, 32),
    "opt": (lambda p: write_tiny_opt(p, 32), "first", 32, 32),
    "llama": (lambda p: testing.write_tiny_llama(p, hidden=32, inter=64, layers=2, heads=4,
                                                 kv_heads=2), "first", 32, 32),
}


def _config(raw, llm_dir, sbert_dir, data_dir):
  c = amazon.get_config(f"{CATEGORY},{raw},{llm_dir}")
  c.data.data_dir = str(data_dir)
  c.llm.dtype, c.llm.remat = "float32", False     # CPU
  c.sbert.path, c.sbert.max_len = str(sbert_dir), 32
  c.cf.num_epochs, c.cf.eval_every, c.cf.grad_splits = 1, 1, 1
  c.stage1.max_steps = 1
  c.stage2.max_steps, c.stage2.batch_size = 2, 2
  c.stage2.len_bucket = 512        # one prompt length: one training program
  c.eval.max_users, c.eval.max_new_tokens, c.eval.batch_size = 4, 2, 4
  c.eval.baselines, c.eval.diagnostics = "", ""
  c.mesh.shape = (1, 1, 1)
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """CF and stage 1 on the generated category, trained once for the three LLMs (stage 2
  is the only stage that reads the LLM)."""
  root = tmp_path_factory.mktemp("amazon_shapes")
  raw = _write_category(root / "raw")
  sbert = testing.write_tiny_sbert(root / "sbert")
  llama = testing.write_tiny_llama(root / "llm0", hidden=32, inter=64, layers=2, heads=4,
                                   kv_heads=2)
  c = _config(raw, llama, sbert, root / "processed")
  c.stages = "cf,stage1"
  runner.train_and_evaluate(c, root / "run")
  return root, raw, sbert


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LLMS))
def test_amazon_pipeline_every_llm_shape(name, base_run, tmp_path):
  root, raw, sbert = base_run
  write, bos, embed_dim, hidden = LLMS[name]
  llm_dir = write(tmp_path / "llm")
  c = _config(raw, llm_dir, sbert, root / "processed")
  c.stage2.bos = bos
  work = tmp_path / "run"
  shutil.copytree(root / "run", work, symlinks=True)
  metrics = runner.train_and_evaluate(c, work)

  loaded = stage2_run.load_llm(c)
  assert (loaded.config.family, loaded.config.embed_dim, loaded.config.hidden_size) == (
      "llama" if name == "llama" else "opt", embed_dim, hidden)
  # The trained projectors emit the input-embedding width (not the hidden width).
  lines = [json.loads(l) for l in (work / "stage2" / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["step"] == 2 and np.isfinite(lines[-1]["train/loss"])
  n = metrics["eval/num_users"]
  assert n == 4
  for k in ("hit@1", "hit@5", "mrr"):
    assert 0 <= metrics[f"test/{k}"] <= 1
  assert metrics["test/hit@1"] <= metrics["test/hit@5"]
  assert metrics["test/mrr"] >= 1 / 20
  assert metrics["test/gen_hit@1"] * n == round(metrics["test/gen_hit@1"] * n)
  assert "| A-LLMRec |" in (work / "results.md").read_text()

  # The prompt's first tokens: OPT's </s> before [U] ("first") or right after it
  # ("after_user", the authors' order).
  ds = prepare.prepare_dataset(c.data)
  builder = stage2_run.prompt_builder(ds, loaded.tokenizer,
                                  config_lib.Stage2Config.from_config(c))
  batch = builder.build(np.array([[0, 1, 2]]), np.array([[3, 4]]), np.array([3]))
  ids, user = np.asarray(batch.input_ids)[0], int(np.asarray(batch.user_pos).ravel()[0])
  first = int(loaded.tokenizer.bos_token_id)
  if name.startswith("opt"):
    assert loaded.tokenizer.convert_ids_to_tokens(first) == "</s>"
  assert (user, int(ids[1 - user])) == ((1, first) if bos == "first" else (0, first))
