"""Stage-2 prompts: one template per domain, assembled by vectorised gathers.

The A-LLMRec recommendation prompt (movies wording; SPEC section 1, stage 2):

  [U] is a user representation. This user has watched "t_1"[H],"t_2"[H],... in the
  previous. Recommend one next movie for this user to watch next from the following movie
  title set, "c_1"[C],"c_2"[C],...,"c_20"[C]. The recommendation is "t_target"<eos>

[U] is a soft token (the projected user representation); each [H]/[C] is a soft token
holding the projected joint embedding of the item it follows. Two layout choices:

- `lead`: what comes before [U]. "bos_user" = a fixed first token, then [U] (the default:
  position 0 of a causal LM becomes an attention sink whose content later positions
  cannot read, so no soft token is put there); "user_bos" = [U], then the BOS (the
  authors' exact order: OPT's tokenizer starts the text with </s> and the user embedding
  is concatenated in front of it); "user" = [U] at position 0, nothing before it.
- `item_slot`: "after_title" = `"title"[C]` (the paper); "in_quotes" = `"[C]title"`, with
  `user_at_answer` the answer opening `... is "[U]` and the target `title"<eos>`: every
  title then directly follows its own item token, so a frozen LM's copy heads (attend to
  the token after an earlier occurrence of the current token, copy it) can answer with
  the candidate whose [C] matches [U] (a named deviation for small LLMs).

Tokenisation is done ONCE: the template's static pieces and, per item, its quoted title in
the two contexts it appears in (` "title"` after the template text, `,"title"` after a soft
token) and as a target (`"title"` + EOS). A soft token splits the text exactly as an added
special token splits it in a Hugging Face tokenizer, and every other piece boundary is a
pre-tokeniser boundary (a word followed by ` "`), so the concatenated ids equal the
tokenisation of the whole prompt string with `[HistoryEmb]`/`[CandidateEmb]` as special
tokens (tests/stage2/test_prompts.py checks this). A batch is then built by numpy gathers
over a flat token pool: no per-sample Python, no tokenizer call in the hot loop, and the
length is padded to a bucket so a run compiles a bounded number of programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# What the soft slots are, per token position.
SLOT_TEXT, SLOT_USER, SLOT_HISTORY, SLOT_CANDIDATE, SLOT_ANSWER_USER = 0, 1, 2, 3, 4

LEADS = ("bos_user", "user_bos", "user")
ITEM_SLOTS = ("after_title", "in_quotes")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """The wording of one domain. Concatenated as documented in the module docstring."""
  user: str            # follows the [U] soft token
  history: str         # precedes the first history title
  middle: str          # between the history and the candidate list
  end: str             # after the last candidate; the answer follows
  genre_question: str  # the language-generation task (paper, section 5)


def _template(past: str, noun: str, verb: str, genre_verb: str) -> PromptTemplate:
  return PromptTemplate(
      user=" is a user representation.",
      history=f" This user has {past}",
      middle=(f" in the previous. Recommend one next {noun} for this user to {verb} next "
              f"from the following {noun} title set,"),
      end=". The recommendation is ",
      genre_question=(f" in the past. Specify the genres this user would enjoy "
                      f"{genre_verb}."),
  )


TEMPLATES: dict[str, PromptTemplate] = {
    "movies": _template("watched", "movie", "watch", "watching"),
    "games": _template("played", "game", "play", "playing"),
    "items": _template("bought", "item", "buy", "buying"),
}


def get_template(domain: str) -> PromptTemplate:
  if domain not in TEMPLATES:
    raise ValueError(f"unknown prompt domain {domain!r} (dataset.domain); known: "
                     f"{sorted(TEMPLATES)}")
  return TEMPLATES[domain]


def quoted(title: str) -> str:
  return f'"{title}"'


def normalize_title(text: str) -> str:
  """Lower case, quotes stripped, whitespace collapsed (the paper's Hit@1 matching)."""
  return " ".join(text.lower().replace('"', "").split())


@dataclasses.dataclass
class PromptBatch:
  """A padded batch of prompts (numpy, ready to device_put).

  input_ids:      int32[B, L]  token ids; soft slots hold `slot_id`
  attention_mask: int32[B, L]  1 = real token or soft slot
  user_pos:       int32[B, U]  positions of the [U] slots (U = 1, or 2 with user_at_answer;
                               L = none -> dropped scatter)
  item_pos:       int32[B, S]  positions of the item soft slots (S = H + C; L where unused)
  item_ids:       int32[B, S]  item id of each item slot (0 where unused)
  target_pos:     int32[B, Tt] positions whose next-token logits predict the target tokens
  target_ids:     int32[B, Tt] the target tokens ("title" + EOS), 0 where unused
  target_mask:    float32[B, Tt]
  prompt_len:     int32[B]     tokens up to and including the prompt's last token
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  user_pos: np.ndarray
  item_pos: np.ndarray
  item_ids: np.ndarray
  target_pos: np.ndarray
  target_ids: np.ndarray
  target_mask: np.ndarray
  prompt_len: np.ndarray

  def arrays(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


def _ragged_table(seqs: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  table = np.zeros((len(seqs), width), np.int32)
  lens = np.zeros((len(seqs),), np.int32)
  for i, s in enumerate(seqs):
    s = list(s)[:width]
    table[i, :len(s)] = s
    lens[i] = len(s)
  return table, lens


class PromptBuilder:
  """Tokenises a template and all item titles once; builds prompt batches by gathers.

  Args:
    tokenizer: a transformers tokenizer (called once per piece/title here, never later).
    titles: item titles, index = item id (titles[0] unused).
    domain: "movies" | "games" | "items".
    max_title_tokens: titles longer than this are cut (counted in `num_truncated_titles`).
    bos_id: the fixed first token (None = none; then `lead` must be "user").
    lead: "bos_user" | "user_bos" | "user" (module docstring); None = "bos_user" with a
      bos_id, else "user".
    item_slot: "after_title" (paper) | "in_quotes" (module docstring).
    user_at_answer: a second [U] slot right before the answer (item_slot "in_quotes" only).
    eos_id: appended after the target title.
    slot_id: token id placed at soft slots (overwritten by embeddings on device).
    pad_id: padding id.
    len_bucket: sequence lengths are padded up to a multiple of this.
  """

  def __init__(self, tokenizer, titles: Sequence[str], domain: str, *,
               max_title_tokens: int = 32, bos_id: int | None = None,
               lead: str | None = None, item_slot: str = "after_title",
               user_at_answer: bool = False, eos_id: int, slot_id: int = 0, pad_id: int = 0,
               len_bucket: int = 64):
    if lead is None:
      lead = "user" if bos_id is None else "bos_user"
    if lead not in LEADS:
      raise ValueError(f"prompt lead {lead!r} unknown (config.stage2.bos); known: {LEADS}")
    if lead != "user" and bos_id is None:
      raise ValueError(f"prompt lead {lead!r} needs a first token but the tokenizer has no "
                       "BOS (set config.stage2.first_token)")
    if item_slot not in ITEM_SLOTS:
      raise ValueError(f"item slot {item_slot!r} unknown (config.stage2.item_slot); known: "
                       f"{ITEM_SLOTS}")
    if user_at_answer and item_slot != "in_quotes":
      raise ValueError("config.stage2.user_at_answer needs config.stage2.item_slot="
                       "'in_quotes' (the answer then opens with the quote before [U])")
    self.lead, self.item_slot, self.user_at_answer = lead, item_slot, bool(user_at_answer)
    self.template = get_template(domain)
    self.slot_id, self.pad_id, self.eos_id = int(slot_id), int(pad_id), int(eos_id)
    self.len_bucket = int(len_bucket)

    def enc(text: str) -> list[int]:
      return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    bos = [] if bos_id is None else [int(bos_id)]
    t = self.template
    static = {
        "bos": bos,                               # the fixed first token
        "user": enc(t.user + t.history),         # after [U]
        "plain": bos + enc(t.history.lstrip()),  # LLM-only prompt start (no [U])
        "middle": enc(t.middle),
        "end": enc(t.end),
        "end_open": enc(t.end + '"'),            # in_quotes: the answer's opening quote
        "genre": enc(t.genre_question),
        "open_first": enc(' "'),                 # in_quotes: before the first item's slot
        "open_rest": enc(',"'),                  # in_quotes: before every other item's slot
    }
    titles = list(titles)
    tables = {   # name -> the token ids of every title in that context
        "first": [enc(" " + quoted(x)) for x in titles],   # ` "title"` after template text
        "rest": [enc("," + quoted(x)) for x in titles],    # `,"title"` after a slot
        "target": [enc(quoted(x)) for x in titles],        # `"title"` (the answer)
        "body": [enc(x + '"') for x in titles],            # `title"` (in_quotes: after a slot)
    }
    self.num_truncated_titles = int(sum(len(x) > max_title_tokens for x in tables["target"]))
    w = max_title_tokens + 1
    ragged = {"first": _ragged_table(tables["first"], w + 1),
              "rest": _ragged_table(tables["rest"], w + 1),
              "body": _ragged_table(tables["body"], w),
              "target": _ragged_table([x[:max_title_tokens] + [self.eos_id]
                                       for x in tables["target"]], w),
              "body_target": _ragged_table([x[:max_title_tokens] + [self.eos_id]
                                            for x in tables["body"]], w)}
    self.target_width = w
    # One flat pool: static pieces, then the title tables, then the slot token.
    pool, self._static = [], {}
    for k, v in static.items():
      self._static[k] = (len(pool), len(v))
      pool.extend(v)
    chunks, base, self._tables = [np.asarray(pool, np.int32)], len(pool), {}
    for k, (table, lens) in ragged.items():
      self._tables[k] = (base, table.shape[1], lens)
      chunks.append(table.ravel())
      base += table.size
    self._slot = base
    self.pool = np.concatenate(chunks + [np.asarray([self.slot_id], np.int32)])
    self.num_items = len(titles) - 1

  # -------------------------------------------------------------- piece plan
  def _title_piece(self, table: str, items: np.ndarray):
    base, width, lens = self._tables[table]
    return base + items * width, lens[items]

  def _item_pieces(self, items: np.ndarray, slot: bool):
    """Pieces of a list of items (right-aligned, 0 = absent).

    Returns (offsets, lengths, slot column) with shape [B, n, P]: P pieces per item, the
    soft slot in column `slot column` (None without slots).
    """
    present = items > 0
    first_idx = np.argmax(present, axis=1)  # first present column
    is_first = (np.arange(items.shape[1])[None, :] == first_idx[:, None]) & present
    s_off = np.full_like(items, self._slot)
    s_len = present.astype(np.int64)
    if slot and self.item_slot == "in_quotes":     # ` "` / `,"`, [slot], `title"`
      o_first, l_first = self._static["open_first"]
      o_rest, l_rest = self._static["open_rest"]
      o_open = np.where(is_first, o_first, o_rest)
      l_open = np.where(is_first, l_first, l_rest) * present
      b_off, b_len = self._title_piece("body", items)
      return (np.stack([o_open, s_off, b_off], -1),
              np.stack([l_open, s_len, b_len * present], -1), 1)
    f_off, f_len = self._title_piece("first", items)
    r_off, r_len = self._title_piece("rest", items)
    off = np.where(is_first, f_off, r_off)
    ln = np.where(is_first, f_len, r_len) * present
    if not slot:
      return off[:, :, None], ln[:, :, None], None
    return np.stack([off, s_off], -1), np.stack([ln, s_len], -1), 1

  def build(self, history: np.ndarray, candidates: np.ndarray | None,
            targets: np.ndarray | None = None, *, soft: bool = True,
            padding: str = "right", task: str = "recommend",
            min_len: int = 0) -> PromptBatch:
    """Assembles a batch.

    Args:
      history: int32[B, H] item ids, most recent last, 0 = absent (left-padded).
      candidates: int32[B, C] item ids in prompt order (None for task="genre").
      targets: int32[B] target item ids (appended after the prompt with EOS), or None.
      soft: include the [U] slot, the user sentence and the item slots (A-LLMRec); False =
        the plain text prompt of the LLM-Only baseline.
      padding: "right" (training) or "left" (generation / scoring).
      task: "recommend" or "genre" (the language-generation task).
      min_len: pad to at least this length.
    Returns:
      PromptBatch.
    """
    history = np.asarray(history, np.int64)
    bsz = history.shape[0]
    offs, lens, kinds = [], [], []

    def as2d(x):
      return (np.asarray(x, np.int64).reshape(bsz, -1) if np.ndim(x)
              else np.full((bsz, 1), x, np.int64))

    def add(off, ln, kind):
      off = as2d(off)
      offs.append(off)
      lens.append(np.broadcast_to(as2d(ln), off.shape))
      kinds.append(np.broadcast_to(as2d(kind), off.shape))

    if soft:
      if self.lead == "bos_user":
        add(*self._static["bos"], SLOT_TEXT)
      add(self._slot, 1, SLOT_USER)
      if self.lead == "user_bos":
        add(*self._static["bos"], SLOT_TEXT)
      add(*self._static["user"], SLOT_TEXT)
    else:
      add(*self._static["plain"], SLOT_TEXT)

    def add_items(items, slot_kind):
      off, ln, col = self._item_pieces(items, soft)
      kind = np.zeros(off.shape, np.int64)
      if col is not None:
        kind[..., col] = slot_kind
      add(off.reshape(bsz, -1), ln.reshape(bsz, -1), kind.reshape(bsz, -1))

    add_items(history, SLOT_HISTORY)
    n_cand = 0
    in_quotes = soft and self.item_slot == "in_quotes"
    if task == "recommend":
      candidates = np.asarray(candidates, np.int64)
      n_cand = candidates.shape[1]
      add(*self._static["middle"], SLOT_TEXT)
      add_items(candidates, SLOT_CANDIDATE)
      add(*self._static["end_open" if in_quotes else "end"], SLOT_TEXT)
      if in_quotes and self.user_at_answer:
        add(self._slot, 1, SLOT_ANSWER_USER)
    elif task == "genre":
      add(*self._static["genre"], SLOT_TEXT)
    else:
      raise ValueError(f"unknown prompt task {task!r}")
    n_prompt_pieces = sum(o.shape[1] for o in offs)
    if targets is not None:
      add(*self._title_piece(self._answer_table(soft), np.asarray(targets, np.int64)),
          SLOT_TEXT)
    off = np.concatenate(offs, 1)
    ln = np.concatenate(lens, 1)
    kind = np.concatenate(kinds, 1)
    return self._assemble(off, ln, kind, n_prompt_pieces, history, candidates, targets,
                          padding, min_len, n_cand)

  # -------------------------------------------------------------- assembly
  def _assemble(self, off, ln, kind, n_prompt_pieces, history, candidates, targets,
                padding, min_len, n_cand) -> PromptBatch:
    bsz, n_pieces = off.shape
    total = ln.sum(1)
    prompt_len = ln[:, :n_prompt_pieces].sum(1)
    width = max(int(total.max()), min_len, 1)
    width = -(-width // self.len_bucket) * self.len_bucket
    shift = (width - total) if padding == "left" else np.zeros_like(total)
    starts = np.cumsum(ln, 1) - ln + shift[:, None]          # piece start positions
    flat_ln = ln.ravel()
    piece = np.repeat(np.arange(bsz * n_pieces), flat_ln)
    within = np.arange(piece.size) - np.repeat(np.cumsum(flat_ln) - flat_ln, flat_ln)
    src = off.ravel()[piece] + within
    dst_row = piece // n_pieces
    dst_col = starts.ravel()[piece] + within
    ids = np.full((bsz, width), self.pad_id, np.int32)
    mask = np.zeros((bsz, width), np.int32)
    ids[dst_row, dst_col] = self.pool[src]
    mask[dst_row, dst_col] = 1

    # Soft slots: positions by kind, in prompt order.
    is_slot = (kind != SLOT_TEXT) & (ln > 0)
    user_pos = np.full((bsz, 1 + self.user_at_answer), width, np.int32)
    for j, k in enumerate((SLOT_USER, SLOT_ANSWER_USER)[:user_pos.shape[1]]):
      u_rows, u_cols = np.nonzero(is_slot & (kind == k))
      user_pos[u_rows, j] = starts[u_rows, u_cols]
    n_hist = history.shape[1]
    s_total = n_hist + n_cand
    item_pos = np.full((bsz, s_total), width, np.int32)
    item_ids = np.zeros((bsz, s_total), np.int32)
    if s_total and np.any(kind == SLOT_HISTORY) | np.any(kind == SLOT_CANDIDATE):
      for k, items, col0 in ((SLOT_HISTORY, history, 0), (SLOT_CANDIDATE, candidates, n_hist)):
        if items is None:
          continue
        cols = np.nonzero((kind == k).any(0))[0]           # the slot piece columns of kind k
        if not len(cols):
          continue
        pos = starts[:, cols]
        present = ln[:, cols] > 0
        item_pos[:, col0:col0 + len(cols)] = np.where(present, pos, width)
        item_ids[:, col0:col0 + len(cols)] = np.where(present, items, 0)

    tw = self.target_width
    target_pos = np.zeros((bsz, tw), np.int32)
    target_ids = np.zeros((bsz, tw), np.int32)
    target_mask = np.zeros((bsz, tw), np.float32)
    if targets is not None:
      t_start = starts[:, -1]
      t_len = ln[:, -1]
      j = np.arange(tw)[None, :]
      valid = j < t_len[:, None]
      pos = np.where(valid, t_start[:, None] + j, 0)
      target_ids[:] = np.where(valid, ids[np.arange(bsz)[:, None], pos], 0)
      target_pos[:] = np.where(valid, pos - 1, 0)
      target_mask[:] = valid
    return PromptBatch(ids, mask, user_pos, item_pos, item_ids, target_pos, target_ids,
                       target_mask, (prompt_len + shift).astype(np.int32))

  def _answer_table(self, soft: bool) -> str:
    return "body_target" if soft and self.item_slot == "in_quotes" else "target"

  def continuations(self, candidates: np.ndarray,
                    soft: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The answer tokens of each candidate ('"title"' + EOS; in_quotes soft prompts:
    'title"' + EOS), for likelihood ranking.

    Args:
      candidates: int[B, C] item ids.
      soft: the A-LLMRec prompt (False: the plain LLM-Only prompt).
    Returns:
      (int32[B, C, Tt] ids, int32[B, C, Tt] mask), right-padded.
    """
    base, width, lens = self._tables[self._answer_table(soft)]
    candidates = np.asarray(candidates, np.int64)
    idx = base + candidates[..., None] * width + np.arange(width)
    mask = (np.arange(width) < lens[candidates][..., None]).astype(np.int32)
    return np.where(mask > 0, self.pool[idx], self.pad_id).astype(np.int32), mask

  # -------------------------------------------------------------- reference
  def prompt_text(self, history: Sequence[int], candidates: Sequence[int] | None,
                  titles: Sequence[str], *, soft: bool = True, task: str = "recommend",
                  hist_token: str = "[HistoryEmb]", cand_token: str = "[CandidateEmb]",
                  user_token: str = "") -> str:
    """The same prompt as one plain string (for display and for tests)."""
    t = self.template
    hist = [i for i in history if i > 0]
    in_quotes = soft and self.item_slot == "in_quotes"

    def item(i, tok):
      return f'"{tok}{titles[i]}"' if in_quotes else quoted(titles[i]) + tok

    h_tok = hist_token if soft else ""
    c_tok = cand_token if soft else ""
    out = (user_token + t.user + t.history) if soft else t.history.lstrip()
    out += " " + ",".join(item(i, h_tok) for i in hist) if hist else ""
    if task == "genre":
      return out + t.genre_question
    out += t.middle + " " + ",".join(item(i, c_tok) for i in candidates)
    if in_quotes:
      return out + t.end + '"' + (user_token if self.user_at_answer else "")
    return out + t.end
