"""Weight loading: HF directories (safetensors, pytorch_model.bin), GGUF helpers, clear
errors, and vocabulary growth for extra special tokens."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
import safetensors.torch
import tokenizers
import torch
import transformers

from allmrec_jax.models import llm as llm_models
from allmrec_jax.weights import gguf as gguf_lib
from allmrec_jax.weights import llm as llm_lib

WORDS = ["<unk>", "<pad>", "</s>", "the", "movie", "is", "good", "bad", "a", "toy", "story"]


def _save_tokenizer(directory: pathlib.Path):
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                                         unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              pad_token="<pad>", eos_token="</s>")
  fast.save_pretrained(str(directory))


def _llama_dir(tmp_path, fmt="safetensors", tie=False):
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
      tie_word_embeddings=tie)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  d = tmp_path / f"llama_{fmt}"
  d.mkdir()
  hf_config.save_pretrained(str(d))
  state = {k: v.contiguous() for k, v in model.state_dict().items()
           if not (tie and k == "lm_head.weight")}
  if fmt == "safetensors":
    safetensors.torch.save_file(state, str(d / "model.safetensors"))
  else:
    torch.save(state, str(d / "pytorch_model.bin"))  # written by the test; read weights_only
  _save_tokenizer(d)
  return d, model


def _ref_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_directory_loads_and_matches(tmp_path, fmt):
  d, model = _llama_dir(tmp_path, fmt)
  loaded = llm_lib.load_llm(d)
  assert isinstance(loaded.module, llm_models.LlamaDecoder)
  ids = loaded.tokenizer(["the toy story movie is good"], return_tensors="np")["input_ids"]
  assert ids.tolist() == [[3, 9, 10, 4, 5, 6]]
  logits, _ = jax.jit(loaded.module.apply)({"params": loaded.params}, input_ids=ids)
  assert float(np.max(np.abs(np.asarray(logits) - _ref_logits(model, ids)))) < 1e-4


def test_bfloat16_load_keeps_dtype(tmp_path):
  d, _ = _llama_dir(tmp_path)
  loaded = llm_lib.load_llm(d, dtype="bfloat16")
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(loaded.params))


def test_opt_directory_bin(tmp_path):
  torch.manual_seed(0)
  hf_config = transformers.OPTConfig(vocab_size=40, hidden_size=32, ffn_dim=48,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=16, word_embed_proj_dim=16,
                                     do_layer_norm_before=False)
  model = transformers.OPTForCausalLM(hf_config).eval()
  d = tmp_path / "opt"
  d.mkdir()
  hf_config.save_pretrained(str(d))
  torch.save(model.state_dict(), str(d / "pytorch_model.bin"))
  _save_tokenizer(d)
  loaded = llm_lib.load_llm(d)
  assert isinstance(loaded.module, llm_models.OPTDecoder) and loaded.config.embed_dim == 16
  ids = np.array([[2, 3, 9, 10, 4]], np.int32)
  logits, _ = loaded.module.apply({"params": loaded.params}, input_ids=ids)
  assert float(np.max(np.abs(np.asarray(logits) - _ref_logits(model, ids)))) < 1e-4


def test_missing_tensor_error_names_file_tensor_shape(tmp_path):
  d, model = _llama_dir(tmp_path)
  state = {k: v.contiguous() for k, v in model.state_dict().items()
           if k != "model.layers.1.mlp.up_proj.weight"}
  safetensors.torch.save_file(state, str(d / "model.safetensors"))
  with pytest.raises(ValueError, match=r"llama_safetensors.*model\.layers\.1\.mlp\.up_proj\.weight"
                     r".*\(32, 48\)"):
    llm_lib.load_llm(d)


def test_shape_mismatch_error(tmp_path):
  d, model = _llama_dir(tmp_path)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
  safetensors.torch.save_file(state, str(d / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn"
                     r"\.k_proj\.weight .*expected \(32, 2, 8\)"):
    llm_lib.load_llm(d)


def test_unknown_architecture_and_bad_path(tmp_path):
  d = tmp_path / "gpt2"
  d.mkdir()
  transformers.GPT2Config(n_layer=1).save_pretrained(str(d))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    llm_lib.load_llm(d)
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    llm_lib.load_llm(tmp_path / "does_not_exist")


def test_gguf_unpermute_inverts_llama_cpp_permutation():
  """llama.cpp's converter interleaves rotary halves per head; unpermute_rows undoes it."""
  heads, dim, width = 3, 8, 5
  w = np.arange(heads * dim * width, dtype=np.float32).reshape(heads * dim, width)
  # llama.cpp convert_hf_to_gguf permute: (h, 2, d/2, ...) -> swap -> (h, d/2, 2, ...)
  permuted = w.reshape(heads, 2, dim // 2, width).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(gguf_lib.unpermute_rows(permuted, heads), w)
  # row 1 of head 0 after permutation is the first row of the second half
  assert permuted[1, 0] == w[dim // 2, 0]


def test_gguf_header_of_embedded_model():
  path = llm_lib.resolve_path(None)
  header = gguf_lib.read_header(path)
  assert header.get("general.architecture") == "llama"
  assert len(header.tensors) == 272 and len(header.get("tokenizer.ggml.tokens")) == 49152
  emb = [t for t in header.tensors if t.name == "token_embd.weight"][0]
  assert emb.dims == (576, 49152)
  row = gguf_lib.tensor_array(header, emb)
  assert row.shape == (49152, 576) and np.isfinite(row).all() and row.std() > 0


def test_corrupt_bytes_in_gguf_data_are_refused(tmp_path):
  """1 MiB of 0xFF inside the embedded GGUF's tensor data (Q4_1 scales become NaN) fails the
  load with the file and a tensor named, instead of loading NaN parameters."""
  import shutil  # pylint: disable=g-import-not-at-top
  src = llm_lib.resolve_path(None)
  dst = tmp_path / src.name
  shutil.copy(src, dst)
  header = gguf_lib.read_header(dst)
  start = sorted(t.offset for t in header.tensors)[len(header.tensors) // 2]
  del header
  with open(dst, "r+b") as f:
    f.seek(start)
    f.write(b"\xff" * (1 << 20))
  with pytest.raises(ValueError, match=rf"{dst.name}: tensor \S+ has \d+ non-finite "
                                       r"value\(s\) \(NaN/Inf\)"):
    llm_lib.load_llm(dst)


def test_corrupt_bytes_in_safetensors_are_refused(tmp_path):
  """4 KiB of 0xFF inside the tensor data (NaN as float32) fail the load with the file and
  the tensor named, instead of loading NaN parameters."""
  d, _ = _llama_dir(tmp_path)
  f = d / "model.safetensors"
  raw = bytearray(f.read_bytes())
  header_len = int.from_bytes(raw[:8], "little")
  start = 8 + header_len + 1024
  raw[start:start + 4096] = b"\xff" * 4096
  f.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor \S+ has \d+ non-finite "
                     r"value\(s\) \(NaN/Inf\).*corrupt"):
    llm_lib.load_llm(d)


def test_check_finite_bfloat16_and_integers():
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from allmrec_jax.weights import hf as hf_lib  # pylint: disable=g-import-not-at-top
  hf_lib.check_finite(np.ones(4, ml_dtypes.bfloat16), "w", "f")
  hf_lib.check_finite(np.arange(4), "ids", "f")          # integer tensors are not checked
  with pytest.raises(ValueError, match=r"f: tensor w has 1 non-finite value\(s\)"):
    hf_lib.check_finite(np.array([1.0, np.inf], ml_dtypes.bfloat16), "w", "f")


@pytest.mark.parametrize("keep", [10, 4096, 1_500_000])   # the header ends at 1,785,664
def test_gguf_cut_inside_its_header_names_the_file(tmp_path, keep):
  src = llm_lib.resolve_path(None)
  cut = tmp_path / "cut.gguf"
  with open(src, "rb") as f:
    cut.write_bytes(f.read(keep))
  with pytest.raises(ValueError, match=r"cut\.gguf: (not a GGUF file|GGUF header is "
                     r"truncated or corrupt)"):
    gguf_lib.read_header(cut)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_safetensors_names_the_file(tmp_path, cut):
  """A safetensors file cut short (inside the tensor data or inside its JSON header) is one
  error naming the file, not a bare SafetensorError."""
  d, _ = _llama_dir(tmp_path)
  f = d / "model.safetensors"
  raw = f.read_bytes()
  header_len = int.from_bytes(raw[:8], "little")
  f.write_bytes(raw[:8 + header_len + 100] if cut == "data" else raw[:8 + header_len // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors "
                                       r"file .*download it again"):
    llm_lib.load_llm(d)
