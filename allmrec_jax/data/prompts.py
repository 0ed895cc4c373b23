"""Stage-2 prompts: one template per domain, assembled by vectorised gathers.

The A-LLMRec recommendation prompt (movies wording; SPEC section 1, stage 2):

  [U] is a user representation. This user has watched "t_1"[H],"t_2"[H],... in the
  previous. Recommend one next movie for this user to watch next from the following movie
  title set, "c_1"[C],"c_2"[C],...,"c_20"[C]. The recommendation is "t_target"<eos>

[U] is a soft token (the projected user representation, the first input embedding); each
[H]/[C] is a soft token holding the projected joint embedding of the item it follows.

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
SLOT_TEXT, SLOT_USER, SLOT_HISTORY, SLOT_CANDIDATE = 0, 1, 2, 3


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
  user_pos:       int32[B]     position of the [U] slot (L = none -> dropped scatter)
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
    add_bos: start every prompt with the tokenizer's BOS, before [U] (as OPT's tokenizer
      does to the paper's prompt string: </s>[UserRep] is a user representation...).
    eos_id: appended after the target title.
    slot_id: token id placed at soft slots (overwritten by embeddings on device).
    pad_id: padding id.
    len_bucket: sequence lengths are padded up to a multiple of this.
  """

  def __init__(self, tokenizer, titles: Sequence[str], domain: str, *,
               max_title_tokens: int = 32, add_bos: bool = False, eos_id: int,
               slot_id: int = 0, pad_id: int = 0, len_bucket: int = 64):
    self.template = get_template(domain)
    self.slot_id, self.pad_id, self.eos_id = int(slot_id), int(pad_id), int(eos_id)
    self.len_bucket = int(len_bucket)

    def enc(text: str) -> list[int]:
      return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    bos = [int(tokenizer.bos_token_id)] if add_bos else []
    t = self.template
    self._has_bos = bool(bos)
    static = {
        "bos": bos,                               # before [U]
        "user": enc(t.user + t.history),         # after [U]
        "plain": bos + enc(t.history.lstrip()),  # LLM-only prompt start (no [U])
        "middle": enc(t.middle),
        "end": enc(t.end),
        "genre": enc(t.genre_question),
    }
    titles = list(titles)
    first = [enc(" " + quoted(x)) for x in titles]
    rest = [enc("," + quoted(x)) for x in titles]
    target = [enc(quoted(x)) for x in titles]
    self.num_truncated_titles = int(sum(len(x) > max_title_tokens for x in target))
    first_t, first_l = _ragged_table(first, max_title_tokens + 2)
    rest_t, rest_l = _ragged_table(rest, max_title_tokens + 2)
    tgt_t, tgt_l = _ragged_table([x[:max_title_tokens] + [self.eos_id] for x in target],
                                 max_title_tokens + 1)
    self.target_width = max_title_tokens + 1
    # One flat pool: static pieces, then the three title tables, then the slot token.
    pool, self._static = [], {}
    for k, v in static.items():
      self._static[k] = (len(pool), len(v))
      pool.extend(v)
    base = len(pool)
    self._first = (base, first_t.shape[1], first_l)
    base += first_t.size
    self._rest = (base, rest_t.shape[1], rest_l)
    base += rest_t.size
    self._target = (base, tgt_t.shape[1], tgt_l)
    base += tgt_t.size
    self._slot = base
    self.pool = np.concatenate([np.asarray(pool, np.int32), first_t.ravel(), rest_t.ravel(),
                                tgt_t.ravel(), np.asarray([self.slot_id], np.int32)])
    self.num_items = len(titles) - 1

  # -------------------------------------------------------------- piece plan
  def _item_pieces(self, items: np.ndarray, slot: bool):
    """Pieces for a list of items (right-aligned, 0 = absent): title then optional slot."""
    b, n = items.shape
    present = items > 0
    first_idx = np.argmax(present, axis=1)  # first present column
    is_first = (np.arange(n)[None, :] == first_idx[:, None]) & present
    f_base, f_w, f_len = self._first
    r_base, r_w, r_len = self._rest
    off = np.where(is_first, f_base + items * f_w, r_base + items * r_w)
    ln = np.where(is_first, f_len[items], r_len[items]) * present
    if not slot:
      return off[:, :, None], ln[:, :, None]
    s_off = np.full_like(off, self._slot)
    s_len = present.astype(ln.dtype)
    return np.stack([off, s_off], -1), np.stack([ln, s_len], -1)

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
      if self._has_bos:
        add(*self._static["bos"], SLOT_TEXT)
      add(self._slot, 1, SLOT_USER)
      add(*self._static["user"], SLOT_TEXT)
    else:
      add(*self._static["plain"], SLOT_TEXT)
    h_off, h_len = self._item_pieces(history, soft)
    h_kind = np.zeros(h_off.shape, np.int64)
    if soft:
      h_kind[..., 1] = SLOT_HISTORY
    add(h_off.reshape(bsz, -1), h_len.reshape(bsz, -1), h_kind.reshape(bsz, -1))
    n_cand = 0
    if task == "recommend":
      candidates = np.asarray(candidates, np.int64)
      n_cand = candidates.shape[1]
      add(*self._static["middle"], SLOT_TEXT)
      c_off, c_len = self._item_pieces(candidates, soft)
      c_kind = np.zeros(c_off.shape, np.int64)
      if soft:
        c_kind[..., 1] = SLOT_CANDIDATE
      add(c_off.reshape(bsz, -1), c_len.reshape(bsz, -1), c_kind.reshape(bsz, -1))
      add(*self._static["end"], SLOT_TEXT)
    elif task == "genre":
      add(*self._static["genre"], SLOT_TEXT)
    else:
      raise ValueError(f"unknown prompt task {task!r}")
    n_prompt_pieces = sum(o.shape[1] for o in offs)
    if targets is not None:
      t_base, t_w, t_len = self._target
      targets = np.asarray(targets, np.int64)
      add(t_base + targets * t_w, t_len[targets], SLOT_TEXT)
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
    user_pos = np.full((bsz,), width, np.int32)
    u_rows, u_cols = np.nonzero(is_slot & (kind == SLOT_USER))
    user_pos[u_rows] = starts[u_rows, u_cols]
    n_hist = history.shape[1]
    s_total = n_hist + n_cand
    item_pos = np.full((bsz, s_total), width, np.int32)
    item_ids = np.zeros((bsz, s_total), np.int32)
    if s_total and np.any(kind == SLOT_HISTORY) | np.any(kind == SLOT_CANDIDATE):
      for k, items, col0 in ((SLOT_HISTORY, history, 0), (SLOT_CANDIDATE, candidates, n_hist)):
        if items is None:
          continue
        cols = np.nonzero((kind == k).any(0))[0]           # the slot piece columns of kind k
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

  def continuations(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The answer tokens ("title" + EOS) of each candidate, for likelihood ranking.

    Args:
      candidates: int[B, C] item ids.
    Returns:
      (int32[B, C, Tt] ids, int32[B, C, Tt] mask), right-padded.
    """
    base, width, lens = self._target
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
    h_tok = hist_token if soft else ""
    c_tok = cand_token if soft else ""
    out = (user_token + t.user + t.history) if soft else t.history.lstrip()
    out += " " + ",".join(quoted(titles[i]) + h_tok for i in hist) if hist else ""
    if task == "genre":
      return out + t.genre_question
    out += t.middle + " " + ",".join(quoted(titles[i]) + c_tok for i in candidates)
    return out + t.end
