"""Prompt assembly vs a plain string construction of the same prompt."""

import copy
import types

import ml_collections
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


def _reference_ids(tok, text, add_bos):
  ref = copy.deepcopy(tok)
  ref.add_special_tokens({"additional_special_tokens": ["[HistoryEmb]", "[CandidateEmb]"]})
  ids = ref(text, add_special_tokens=False)["input_ids"]
  if add_bos:
    ids = [tok.bos_token_id] + ids
  return ids, ref.convert_tokens_to_ids("[HistoryEmb]"), ref.convert_tokens_to_ids("[CandidateEmb]")


@pytest.mark.parametrize("domain", ["movies", "games"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_soft_prompt_matches_plain_string(tokenizer, domain, add_bos):
  slot = 7
  builder = prompts.PromptBuilder(tokenizer, TITLES, domain, add_bos=add_bos,
                                  eos_id=tokenizer.eos_token_id, slot_id=slot, pad_id=0,
                                  len_bucket=16)
  history = np.array([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 0, 9]])
  cands = np.array([[10, 11, 12], [3, 13, 14], [15, 16, 1]])
  targets = np.array([11, 3, 16])
  for padding in ("right", "left"):
    batch = builder.build(history, cands, targets, padding=padding)
    for b in range(3):
      text = builder.prompt_text(history[b], cands[b], TITLES)
      ref, h_id, c_id = _reference_ids(tokenizer, text, add_bos)
      tgt = tokenizer(prompts.quoted(TITLES[targets[b]]), add_special_tokens=False)["input_ids"]
      tgt = tgt + [tokenizer.eos_token_id]
      # BOS (if any), the [U] slot, the prompt, then target + EOS: what the tokenizer
      # gives for "[UserRep]" + text with [UserRep] a special token.
      nb = int(add_bos)
      full = ref[:nb] + [slot] + ref[nb:] + tgt
      ref = ref[nb:]
      row = batch.input_ids[b][batch.attention_mask[b] == 1]
      expect = np.array(full)
      expect[nb + 1:nb + 1 + len(ref)][np.isin(ref, [h_id, c_id])] = slot
      np.testing.assert_array_equal(row, expect)
      offset = np.nonzero(batch.attention_mask[b])[0][0]
      assert batch.user_pos[b] == offset + nb
      # item slots: the positions of the special tokens, in order, with their items
      slots = offset + nb + 1 + np.nonzero(np.isin(ref, [h_id, c_id]))[0]
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
    assert batch.input_ids.shape[1] % 16 == 0


def test_plain_prompt_has_no_slots(tokenizer):
  builder = prompts.PromptBuilder(tokenizer, TITLES, "movies", eos_id=tokenizer.eos_token_id,
                                  slot_id=5, len_bucket=8)
  batch = builder.build(np.array([[1, 2]]), np.array([[3, 4]]), None, soft=False,
                        padding="left")
  row = batch.input_ids[0][batch.attention_mask[0] == 1]
  text = tokenizer.decode(row)
  assert text == builder.prompt_text([1, 2], [3, 4], TITLES, soft=False)
  assert batch.user_pos[0] == batch.input_ids.shape[1]
  assert np.all(batch.item_ids == 0)
  assert batch.target_mask.sum() == 0


def test_unknown_domain():
  with pytest.raises(ValueError, match="unknown prompt domain"):
    prompts.get_template("books")


def test_normalize_title():
  assert prompts.normalize_title(' "Toy  Story" ') == "toy story"


def test_prompt_builder_bos_option(tokenizer):
  """config.stage2.bos: SmolLM2's tokenizer adds no BOS, so "auto" puts [U] at position 0;
  "always" puts the BOS there and [U] after it; an unknown value names the flag."""
  from allmrec_jax.trainers import pipeline  # pylint: disable=import-outside-toplevel
  ds = types.SimpleNamespace(titles=TITLES, domain="movies")
  cfg = ml_collections.ConfigDict({"max_title_tokens": 32, "len_bucket": 8, "bos": "auto"})
  rows = {}
  for bos in ("auto", "never", "always"):
    cfg.bos = bos
    batch = pipeline.prompt_builder(ds, tokenizer, cfg).build(
        np.array([[1, 2]]), np.array([[3, 4]]), None, padding="right")
    rows[bos] = (int(batch.user_pos[0]), batch.input_ids[0][batch.attention_mask[0] == 1])
  assert rows["auto"][0] == 0 and rows["never"][0] == 0 and rows["always"][0] == 1
  assert rows["always"][1][0] == tokenizer.bos_token_id
  np.testing.assert_array_equal(rows["always"][1][1:], rows["auto"][1])
  cfg.bos = "sometimes"
  with pytest.raises(ValueError, match="config.stage2.bos"):
    pipeline.prompt_builder(ds, tokenizer, cfg)
