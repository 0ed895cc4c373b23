"""Faithfulness to the authors' A-LLMRec, number by number (float32, CPU).

The same tiny weights and batch go through the JAX trainer's functions and through the
PyTorch re-creation of the authors' computation (benchmarks/torch_peer.py, `authors_*`):

- stage 1: `trainers.stage1.stage1_loss` (SBERT outputs Q given as a table, x_u and E from
  a tiny SASRec) against `pre_train_phase1`'s arithmetic: the four loss terms, the total,
  the gradients of the item / text auto-encoder weights and of the SBERT outputs (which
  reach SBERT only through f_T^enc, the target being `Q.data`).
- stage 2: a tiny random PyTorch OPT set up as `llm4rec` does (special tokens added, the
  embeddings resized) and the same weights in our Flax OPT through the project's loader;
  the prompt built by stage2_run.prompt_builder with config.stage2.bos="after_user" ([U]
  first, then OPT's </s>) against the authors' `[U]`-in-front concatenation: the token ids,
  the assembled input embeddings, the target positions, the LM loss and the projector
  gradients. The one textual difference is stated: the authors write
  "representation.This user", our template "representation. This user"; the reference
  prompt is given that space so that the two token sequences can be compared.

Tolerances (float32 on both sides; the measured maxima are far below them):
  losses rtol 1e-5; stage-1 gradients atol 1e-7 + rtol 1e-4 (values up to 0.1); input
  embeddings atol 1e-5 (values up to 2.5); stage-2 projector gradients atol 1e-9 + rtol
  1e-4 (values ~1e-5: the tiny random OPT's loss barely depends on them).
"""

from __future__ import annotations

import copy
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.models import aligner
from allmrec_jax.models import cf as cf_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.models import soft_prompt
from allmrec_jax.models.llm import OPTConfig, OPTDecoder
from allmrec_jax.trainers import stage2_run
from allmrec_jax.trainers import stage1
from allmrec_jax.trainers import stage2
from allmrec_jax.weights import hf as hf_lib
from allmrec_jax.weights import llm as llm_lib
from configs import base

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import torch_peer  # benchmarks/ is not a package: imported from its folder

LOSS_RTOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-7, 1e-4
EMBED_ATOL = 1e-5
PROJ_GRAD_ATOL, PROJ_GRAD_RTOL = 1e-9, 1e-4


def _close(name, got, want, rtol=0.0, atol=0.0):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  diff = float(np.max(np.abs(got - want))) if got.size else 0.0
  print(f"{name}: max |diff| {diff:.3g} (max |value| {float(np.max(np.abs(want))):.3g})")
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------- stage 1
N_ITEMS, CF_DIM, TEXT_DIM, MAXLEN, BATCH = 30, 12, 16, 8, 6


def _stage1_setup():
  config = base.get_base_config()
  config.data.maxlen = MAXLEN
  config.cf.hidden_dim = CF_DIM
  config.cf.num_blocks = 1
  cfg = stage1.Stage1Config.from_config(config)
  cf_conf = dict(config.cf)
  cf_conf.update(model="sasrec", maxlen=MAXLEN)
  cf_model = cf_lib.make_cf_model(cf_conf, N_ITEMS)
  seq0 = jnp.ones((1, MAXLEN), jnp.int32)
  cf_params = nn.unbox(jax.jit(cf_model.init)(jax.random.key(0), seq0, seq0, seq0))
  models = stage1.Stage1Models(aligner.ItemAutoEncoder(CF_DIM, cfg.latent_dim),
                               aligner.TextAutoEncoder(TEXT_DIM, cfg.latent_dim), None)
  trainable = jax.jit(lambda k: stage1.init_trainable(models, k, None, freeze_sbert=True))(
      jax.random.key(1))
  rng = np.random.default_rng(0)
  text_table = rng.normal(size=(N_ITEMS + 1, TEXT_DIM)).astype(np.float32)
  lengths = rng.integers(2, MAXLEN + 1, BATCH)
  seq = np.zeros((BATCH, MAXLEN), np.int32)
  pos, neg = np.zeros(BATCH, np.int32), np.zeros(BATCH, np.int32)
  for b, n in enumerate(lengths):
    items = rng.choice(np.arange(1, N_ITEMS + 1), n + 2, replace=False)
    seq[b, MAXLEN - n:] = items[:n]
    pos[b], neg[b] = items[n], items[n + 1]
  frozen = {"cf": stage1.cf_variables(cf_params),
            "item_table": jax.jit(stage1.cf_item_table, static_argnums=0)(cf_model, cf_params),
            "text_table": jnp.asarray(text_table)}
  user = jax.jit(functools.partial(cf_model.apply, method=cf_model.user_representation))(
      frozen["cf"], seq)                                  # x_u, as the loss computes it
  batch = {"seq": seq, "pos": pos, "neg": neg, "mask": np.ones(BATCH, np.float32)}
  loss_fn = functools.partial(stage1.stage1_loss, models=models, cf_model=cf_model, cfg=cfg)
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  return value_and_grad, trainable, frozen, batch, np.asarray(user)


@pytest.fixture(scope="module")
def stage1_case():
  return _stage1_setup()


def _torch_weights(trainable):
  """Our {"item_ae", "text_ae"} trees as torch-layout tensors (Linear weight = kernel.T)."""
  out = {}
  for name in ("item_ae", "text_ae"):
    for ours, theirs in (("encoder", "enc"), ("decoder", "dec")):
      layer = trainable[name][ours]
      out[f"{name}.{theirs}.weight"] = np.asarray(layer["kernel"]).T
      out[f"{name}.{theirs}.bias"] = np.asarray(layer["bias"])
  return out


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padding_row"])
def test_stage1_losses_and_gradients_equal_the_authors(stage1_case, padded):
  """A padding row of our batch (mask 0) must count as absent: the authors' micro-batch
  then holds the real rows only."""
  value_and_grad, trainable, frozen, batch, user = stage1_case
  batch = dict(batch, mask=batch["mask"].copy())
  if padded:
    batch["mask"][-1] = 0.0
  (total, terms), (g_train, g_frozen) = value_and_grad(trainable, frozen, batch,
                                                       jax.random.key(2))

  real = batch["mask"] > 0
  pos, neg = batch["pos"][real], batch["neg"][real]
  table, text = np.asarray(frozen["item_table"]), np.asarray(frozen["text_table"])
  want, grads = torch_peer.authors_stage1_reference(
      _torch_weights(trainable), user[real], table[pos], table[neg], text[pos], text[neg])

  for k in stage1.LOSS_TERMS:
    _close(f"stage1 {k}", terms[k], want[k], rtol=LOSS_RTOL)
  _close("stage1 total", total, want["total"], rtol=LOSS_RTOL)
  for name in ("item_ae", "text_ae"):
    for ours, theirs in (("encoder", "enc"), ("decoder", "dec")):
      g = g_train[name][ours]
      _close(f"d total / d {name}.{theirs}.weight", np.asarray(g["kernel"]).T,
             grads[f"{name}.{theirs}.weight"], rtol=GRAD_RTOL, atol=GRAD_ATOL)
      _close(f"d total / d {name}.{theirs}.bias", g["bias"],
             grads[f"{name}.{theirs}.bias"], rtol=GRAD_RTOL, atol=GRAD_ATOL)
  # The SBERT outputs: each row's gradient is what SBERT would receive (pos and neg rows of
  # the table accumulate, as they would into SBERT's weights).
  want_text = np.zeros_like(text)
  np.add.at(want_text, pos, grads["pos_text"])
  np.add.at(want_text, neg, grads["neg_text"])
  _close("d total / d Q (SBERT outputs)", g_frozen["text_table"], want_text,
         rtol=GRAD_RTOL, atol=GRAD_ATOL)
  assert np.abs(want_text).max() > 1e-4     # a real gradient, not two zero arrays


# ---------------------------------------------------------------------------- stage 2
WORDS = ["Star", "Wars", "Toy", "Story", "Heat", "Casino", "Fargo", "Babe", "Alien", "Dune",
         "Night", "City", "Love", "War", "Blue", "Red", "Dead", "Man", "Lost", "Home"]
N_TITLES, USER_DIM, LLM_DIM = 24, 10, 32
# Two users: history (prompt order), candidates (prompt order, the target among them), target.
EXAMPLES = [([3, 7, 11], [5, 19, 2, 13], 19),
            ([4, 21], [8, 1, 17, 6], 1)]


def _titles():
  rng = np.random.default_rng(5)
  return [""] + [f"{' '.join(rng.choice(WORDS, size=rng.integers(1, 4)))} ({1950 + i})"
                 for i in range(1, N_TITLES + 1)]


def _opt_tokenizer(corpus):
  """An OPT-like tokenizer: GPT-2 byte-level BPE (trained here on the test's prompts: no
  OPT tokenizer exists offline), <s> <pad> </s> <unk> = ids 0..3 as OPT's, and </s> put in
  front of every text as OPT's tokenizer does."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  specials = ["<s>", "<pad>", "</s>", "<unk>"]
  tk.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=320, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tk.post_processor = processors.TemplateProcessing(single="</s> $A",
                                                    special_tokens=[("</s>", 2)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>")


def _hf_opt(vocab):
  torch.manual_seed(0)
  cfg = transformers.OPTConfig(vocab_size=vocab, hidden_size=LLM_DIM, ffn_dim=64,
                               num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=512, word_embed_proj_dim=LLM_DIM,
                               dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
  model = transformers.OPTForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _ours(model):
  """Our Flax OPT with `model`'s weights, through the project's loader."""
  config = OPTConfig.from_hf(model.config)
  module = OPTDecoder(config)
  return module, llm_lib.load_params(module, config, hf_lib.DictSource(model.state_dict()))


def _projector_pairs(proj_params):
  """(torch F_I, torch F_U) holding our projector weights (biases and LayerNorm perturbed
  first, so that every weight matters), and the perturbed tree."""
  rng = np.random.default_rng(7)
  p = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(
      np.float32), proj_params)
  nets = {}
  for name, act in (("item_proj", torch.nn.GELU()), ("user_proj", torch.nn.LeakyReLU())):
    t = p["params"][name]
    net = torch_peer.projector(t["fc1"]["kernel"].shape[0], LLM_DIM, act)
    net.load_state_dict({
        "0.weight": torch.tensor(t["fc1"]["kernel"].T), "0.bias": torch.tensor(t["fc1"]["bias"]),
        "1.weight": torch.tensor(t["norm"]["scale"]), "1.bias": torch.tensor(t["norm"]["bias"]),
        "3.weight": torch.tensor(t["fc2"]["kernel"].T), "3.bias": torch.tensor(t["fc2"]["bias"])})
    nets[name] = net
  return nets, jax.tree.map(jnp.asarray, p)


@pytest.fixture(scope="module")
def stage2_case():
  titles = _titles()
  config = base.get_base_config()
  config.stage2.bos = "after_user"           # the authors' order: [U], then OPT's </s>
  corpus = [torch_peer.authors_prompt_text(titles, h, c, space_after_user=True)
            .replace("[HistoryEmb]", "").replace("[CandidateEmb]", "") for h, c, _ in EXAMPLES]
  corpus += [f'"{t}"' for t in titles[1:]] * 3
  tok = _opt_tokenizer(corpus)
  model = _hf_opt(len(tok))
  product = _ours(model)                     # the checkpoint as the product loads it
  authors_model, authors_tok = torch_peer.authors_llm_setup(copy.deepcopy(model),
                                                            copy.deepcopy(tok))
  resized = _ours(authors_model)             # the same weights after the authors' resize
  rng = np.random.default_rng(0)
  seqs = rng.integers(1, N_TITLES + 1, 20).astype(np.int32)
  ds = dataset_lib.build_dataset(
      name="tiny", domain="movies", seq_offsets=np.array([0, 10, 20]), seq_items=seqs,
      num_items=N_TITLES, titles=titles, descriptions=[""] * (N_TITLES + 1),
      genres=[[] for _ in range(N_TITLES + 1)], candidate_seed=3)
  builder = stage2_run.prompt_builder(ds, tok, config.stage2)
  hmax = max(len(h) for h, _, _ in EXAMPLES)
  history = np.array([[0] * (hmax - len(h)) + h for h, _, _ in EXAMPLES], np.int32)
  cands = np.array([c for _, c, _ in EXAMPLES], np.int32)
  targets = np.array([t for _, _, t in EXAMPLES], np.int32)
  batch = builder.build(history, cands, targets).arrays()
  item_table = rng.uniform(size=(N_TITLES + 1, 128)).astype(np.float32)  # sigmoid codes
  batch["user_rep"] = rng.normal(size=(len(EXAMPLES), USER_DIM)).astype(np.float32)
  projectors = projectors_lib.Stage2Projectors(128, USER_DIM, LLM_DIM)
  nets, proj_params = _projector_pairs(
      stage2.init_projectors(projectors, jax.random.key(3), 128, USER_DIM))
  ref = torch_peer.authors_stage2_forward(
      authors_model, authors_tok, nets["item_proj"], nets["user_proj"],
      torch.tensor(batch["user_rep"]), [item_table[h] for h, _, _ in EXAMPLES],
      [item_table[c] for _, c, _ in EXAMPLES],
      [torch_peer.authors_prompt_text(titles, h, c, space_after_user=True)
       for h, c, _ in EXAMPLES], [titles[t] for t in targets])
  ref["loss"].backward()
  return dict(tok=tok, authors_tok=authors_tok, product=product, resized=resized,
              batch={k: jnp.asarray(v) for k, v in batch.items()}, item_table=item_table,
              projectors=projectors, proj_params=proj_params, nets=nets, ref=ref)


def test_stage2_prompt_tokens_and_targets_equal_the_authors(stage2_case):
  """Our ids are the authors' with [U] in front, each [HistoryEmb] / [CandidateEmb] id
  replaced by our slot id; the targets are the authors' labels."""
  c = stage2_case
  ref, batch, tok, atok = c["ref"], c["batch"], c["tok"], c["authors_tok"]
  ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
  theirs = ref["input_ids"].numpy()
  slot = np.isin(theirs, atok.convert_tokens_to_ids(["[HistoryEmb]", "[CandidateEmb]"]))
  width = 1 + theirs.shape[1]
  att = ref["attention_mask"].numpy()
  assert ids.shape[1] >= width and not mask[:, width:].any()
  np.testing.assert_array_equal(mask[:, :width], att)
  assert (ids[:, 1] == tok.bos_token_id).all() and tok.bos_token == "</s>"  # [U], then </s>
  want = np.where(slot, tok.pad_token_id, theirs)
  np.testing.assert_array_equal(np.where(att[:, 1:] > 0, ids[:, 1:width], -1),
                                np.where(att[:, 1:] > 0, want, -1))
  assert (ids[:, 0] == tok.pad_token_id).all()                       # the [U] slot
  np.testing.assert_array_equal(np.asarray(batch["user_pos"]).reshape(-1), 0)
  labels = ref["labels"].numpy()
  w = np.asarray(batch["target_mask"]) > 0
  got = np.full_like(labels, -100)
  rows = np.nonzero(w)[0]
  got[rows, np.asarray(batch["target_pos"])[w] + 1] = np.asarray(batch["target_ids"])[w]
  np.testing.assert_array_equal(got, labels)


def test_stage2_input_embeddings_and_loss_equal_the_authors(stage2_case):
  c = stage2_case
  ref, batch = c["ref"], c["batch"]
  module, params = c["resized"]
  llm_params = {"params": params}
  table = jnp.asarray(c["item_table"])
  embeds = jax.jit(lambda lp, pp, tb, bt: soft_prompt.soft_prompt_embeds(
      module, lp, c["projectors"], pp, tb, bt))(llm_params, c["proj_params"], table, batch)
  theirs = ref["inputs_embeds"].detach().numpy()
  att = ref["attention_mask"].numpy() > 0
  got = np.asarray(embeds)[:, :theirs.shape[1]]
  _close("stage2 input embeddings (real positions)", got[att], theirs[att], atol=EMBED_ATOL)
  loss_fn = functools.partial(stage2.lm_loss, llm=module, projectors=c["projectors"])
  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      c["proj_params"], llm_params, table, batch)
  assert int(aux["tokens"]) == int((ref["labels"] != -100).sum())
  _close("stage2 LM loss (authors' resized vocabulary)", loss, float(ref["loss"].detach()),
         rtol=LOSS_RTOL)
  for name, net in c["nets"].items():
    g = grads["params"][name]
    for ours, theirs_w, t in (("fc1", "0.weight", True), ("fc1", "0.bias", False),
                              ("fc2", "3.weight", True), ("fc2", "3.bias", False)):
      gt = net.get_parameter(theirs_w).grad.numpy()
      mine = np.asarray(g[ours]["kernel"]).T if t else g[ours]["bias"]
      _close(f"d loss / d {name}.{theirs_w}", mine, gt, rtol=PROJ_GRAD_RTOL,
             atol=PROJ_GRAD_ATOL)
    _close(f"d loss / d {name}.norm.scale", g["norm"]["scale"],
           net.get_parameter("1.weight").grad.numpy(), rtol=PROJ_GRAD_RTOL,
           atol=PROJ_GRAD_ATOL)


def test_stage2_product_vocabulary_is_the_authors_softmax_without_added_rows(stage2_case):
  """The product loads the checkpoint as it is (soft slots are positions, no tokens are
  added), so its softmax runs over the original V ids; the authors' over V + 4 (the added
  [PAD] and three slot tokens, resized rows). Our loss equals the authors' cross-entropy
  restricted to the first V logits, and the gap to their loss is that of the 4 rows."""
  c = stage2_case
  ref, batch = c["ref"], c["batch"]
  module, params = c["product"]
  v = module.config.vocab_size
  assert v == len(c["tok"]) and len(c["authors_tok"]) == v + 4
  loss, _ = jax.jit(functools.partial(stage2.lm_loss, llm=module, projectors=c["projectors"]))(
      c["proj_params"], {"params": params}, jnp.asarray(c["item_table"]), batch)
  logits, labels = ref["logits"].detach()[:, :-1], ref["labels"][:, 1:]
  want = torch.nn.functional.cross_entropy(logits[..., :v].reshape(-1, v), labels.reshape(-1),
                                           ignore_index=-100)
  _close("stage2 LM loss (product vocabulary V)", loss, float(want), rtol=LOSS_RTOL)
  print(f"authors' loss over V+4: {float(ref['loss'].detach()):.6f}; over V: {float(want):.6f}")
