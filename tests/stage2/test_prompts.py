"""Prompt assembly vs a plain string construction of the same prompt."""

import copy
import re
import types

import numpy as np
import pytest
import transformers

from allmrec_jax import assets
from allmrec_jax.data import prompts

TITLES = ["", "Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat",
          "Shanghai Triad (Yao a yao yao dao waipo qiao)", "Twelve Monkeys", "Babe",
          "Dead Man Walking", "Richard III", "Seven (Se7en)", "Usual Suspects, The",
          "Mighty Aphrodite", "Postino, Il", "Mr. Holland's Opus", "French Twist (Gazon maudit)"]


@pytest.fixture(scope="module")
def tokenizer():
  gguf = assets.get_asset("smollm2-135m")
  tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  return tok


def _reference_ids(tok, text):
  ref = copy.deepcopy(tok)
  ref.add_special_tokens({"additional_special_tokens": ["[UserRep]", "[HistoryEmb]",
                                                        "[CandidateEmb]"]})
  ids = ref(text, add_special_tokens=False)["input_ids"]
  return ids, [ref.convert_tokens_to_ids(t) for t in ("[UserRep]", "[HistoryEmb]",
                                                      "[CandidateEmb]")]


def _piecewise_ids(tok, text):
  """in_quotes prompts: every title is tokenised on its own as `title"` (exactly the
  answer's tokens), every other piece between the soft tokens and quotes on its own."""
  specials = ["[UserRep]", "[HistoryEmb]", "[CandidateEmb]"]
  ids_of = {t: -(i + 1) for i, t in enumerate(specials)}
  parts = re.split(r'(\[UserRep\]|\[HistoryEmb\]|\[CandidateEmb\])', text)
  out, after_slot = [], False
  for part in parts:
    if part in ids_of:
      out.append(ids_of[part])
      after_slot = part != "[UserRep]"
      continue
    if after_slot:   # `title"` then the rest (`,"` or the template text)
      cut = part.index('"') + 1
      out += tok(part[:cut], add_special_tokens=False)["input_ids"]
      part = part[cut:]
    out += tok(part, add_special_tokens=False)["input_ids"]
    after_slot = False
  return out, [ids_of[t] for t in specials]


LAYOUTS = [("bos_user", "after_title", False), ("user_bos", "after_title", False),
           ("user", "after_title", False), ("bos_user", "in_quotes", False),
           ("bos_user", "in_quotes", True)]


@pytest.mark.parametrize("domain", ["movies", "games"])
@pytest.mark.parametrize("lead,item_slot,user_at_answer", LAYOUTS)
def test_soft_prompt_matches_plain_string(tokenizer, domain, lead, item_slot,
                                          user_at_answer):
  """Every layout equals the HF tokenisation of the same prompt string with the soft
  tokens as added special tokens; slots, items and targets sit where the string puts them."""
  slot = 7
  bos = tokenizer.bos_token_id
  builder = prompts.PromptBuilder(tokenizer, TITLES, domain, bos_id=bos, lead=lead,
                                  item_slot=item_slot, user_at_answer=user_at_answer,
                                  eos_id=tokenizer.eos_token_id, slot_id=slot, pad_id=0,
                                  len_bucket=16)
  history = np.array([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 0, 9]])
  cands = np.array([[10, 11, 12], [3, 13, 14], [15, 16, 1]])
  targets = np.array([11, 3, 16])
  for padding in ("right", "left"):
    batch = builder.build(history, cands, targets, padding=padding)
    for b in range(3):
      text = builder.prompt_text(history[b], cands[b], TITLES, user_token="[UserRep]")
      if item_slot == "in_quotes":
        ref, (u_id, h_id, c_id) = _piecewise_ids(tokenizer, text)
      else:
        ref, (u_id, h_id, c_id) = _reference_ids(tokenizer, text)
      if lead == "bos_user":
        ref = [bos] + ref
      elif lead == "user_bos":
        ref = ref[:1] + [bos] + ref[1:]
      answer = (TITLES[targets[b]] + '"' if item_slot == "in_quotes"
                else prompts.quoted(TITLES[targets[b]]))
      tgt = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
      ref = np.array(ref)
      expect = np.concatenate([np.where(np.isin(ref, [u_id, h_id, c_id]), slot, ref), tgt])
      row = batch.input_ids[b][batch.attention_mask[b] == 1]
      np.testing.assert_array_equal(row, expect)
      offset = np.nonzero(batch.attention_mask[b])[0][0]
      np.testing.assert_array_equal(batch.user_pos[b], offset + np.nonzero(ref == u_id)[0])
      assert batch.user_pos.shape[1] == 1 + user_at_answer
      # item slots: the positions of the special tokens, in order, with their items
      slots = offset + np.nonzero(np.isin(ref, [h_id, c_id]))[0]
      items = np.concatenate([history[b][history[b] > 0], cands[b]])
      used = batch.item_ids[b] > 0
      np.testing.assert_array_equal(batch.item_pos[b][used], slots)
      np.testing.assert_array_equal(batch.item_ids[b][used], items)
      assert np.all(batch.item_pos[b][~used] == batch.input_ids.shape[1])
      # targets: the label positions predict exactly the target tokens
      n = int(batch.target_mask[b].sum())
      assert n == len(tgt)
      tp = batch.target_pos[b][:n]
      np.testing.assert_array_equal(batch.input_ids[b][tp + 1], tgt)
      assert batch.prompt_len[b] == tp[0] + 1
      # ranking continuations are the same answer tokens
      cont, cmask = builder.continuations(targets[b:b + 1, None])
      np.testing.assert_array_equal(cont[0, 0][cmask[0, 0] > 0], tgt)
    assert batch.input_ids.shape[1] % 16 == 0


def test_default_prompts_put_no_soft_token_at_position_0(tokenizer):
  """Every config's default layout starts with a fixed text token, never a soft slot."""
  import importlib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2_run  # pylint: disable=import-outside-toplevel
  ds = types.SimpleNamespace(titles=TITLES, domain="movies")
  for name in ("base", "ml100k", "ml100k_long"):
    cfg = importlib.import_module(f"configs.{name}")
    c = cfg.get_config() if hasattr(cfg, "get_config") else cfg.get_base_config()
    builder = stage2_run.prompt_builder(ds, tokenizer, c.stage2)
    for padding in ("right", "left"):
      batch = builder.build(np.array([[1, 2]]), np.array([[3, 4]]), np.array([3]),
                            padding=padding)
      first = int(np.nonzero(batch.attention_mask[0])[0][0])
      assert first not in set(batch.user_pos[0]) | set(batch.item_pos[0]), name
      assert batch.input_ids[0, first] == tokenizer.bos_token_id, name


def test_plain_prompt_has_no_slots(tokenizer):
  builder = prompts.PromptBuilder(tokenizer, TITLES, "movies", eos_id=tokenizer.eos_token_id,
                                  slot_id=5, len_bucket=8)
  batch = builder.build(np.array([[1, 2]]), np.array([[3, 4]]), None, soft=False,
                        padding="left")
  row = batch.input_ids[0][batch.attention_mask[0] == 1]
  text = tokenizer.decode(row)
  assert text == builder.prompt_text([1, 2], [3, 4], TITLES, soft=False)
  assert np.all(batch.user_pos[0] == batch.input_ids.shape[1])
  assert np.all(batch.item_ids == 0)
  assert batch.target_mask.sum() == 0


def test_unknown_domain():
  with pytest.raises(ValueError, match="unknown prompt domain"):
    prompts.get_template("books")


def test_normalize_title():
  assert prompts.normalize_title(' "Toy  Story" ') == "toy story"


def test_prompt_builder_bos_option(tokenizer):
  """config.stage2.bos: "first" puts SmolLM2's BOS at 0 and [U] at 1; "after_user" (the
  authors' order) [U] at 0 then the BOS; "none" [U] at 0; first_token names another token;
  an unknown value or token names the flag."""
  from allmrec_jax.trainers import stage2_run  # pylint: disable=import-outside-toplevel
  ds = types.SimpleNamespace(titles=TITLES, domain="movies")
  from configs import base  # pylint: disable=import-outside-toplevel
  cfg = base.get_base_config().stage2
  cfg.len_bucket = 8
  rows = {}
  for bos in ("first", "after_user", "none"):
    cfg.bos = bos
    batch = stage2_run.prompt_builder(ds, tokenizer, cfg).build(
        np.array([[1, 2]]), np.array([[3, 4]]), None, padding="right")
    rows[bos] = (int(batch.user_pos[0, 0]), batch.input_ids[0][batch.attention_mask[0] == 1])
  assert rows["first"][0] == 1 and rows["after_user"][0] == 0 and rows["none"][0] == 0
  assert rows["first"][1][0] == tokenizer.bos_token_id
  assert rows["after_user"][1][1] == tokenizer.bos_token_id
  np.testing.assert_array_equal(rows["first"][1][1:], rows["none"][1])
  cfg.bos, cfg.first_token = "first", "<|im_end|>"
  batch = stage2_run.prompt_builder(ds, tokenizer, cfg).build(
      np.array([[1, 2]]), np.array([[3, 4]]), None, padding="right")
  assert batch.input_ids[0, 0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
  cfg.first_token = "<|no such token|>"
  with pytest.raises(ValueError, match="config.stage2.first_token"):
    stage2_run.prompt_builder(ds, tokenizer, cfg)
  cfg.bos, cfg.first_token = "sometimes", ""
  with pytest.raises(ValueError, match="config.stage2.bos"):
    stage2_run.prompt_builder(ds, tokenizer, cfg)
