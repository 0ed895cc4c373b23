r"""PyTorch peer of the speed benchmarks: the original A-LLMRec code's way of computing.

The benchmarks (bench_stage1.py, bench_stage2.py, through bench_common.run_peer) time our
jitted JAX steps against this script, which redoes, in eager PyTorch, what the authors'
code (github.com/ghdtjr/A-LLMRec) does per training / inference step:

  stage1    models/a_llmrec_model.py `pre_train_phase1`: a frozen SASRec
            (pre_train/sasrec/model.py, held by models/recsys_model.py) run under no_grad
            in training mode (its dropout on) over the users' sequences; per user the
            last position's representation, positive item (last training item) and
            sampled negative; per micro-batch of 60 users the item texts tokenised, the
            SBERT forward with gradients on the positive and the negative texts, the item
            auto-encoder (d -> 128 -> d) and the text auto-encoder (384 -> 128 -> 384),
            the four losses (BCE on the mean of user * reconstructed item, latent
            matching MSE, 0.5 * item reconstruction MSE, 0.2 * text reconstruction MSE),
            backward, and an Adam step (lr 1e-4, betas 0.9 / 0.98, as train_model.py).
  stage2    `pre_train_phase2` + models/llm4rec.py `forward`: per sample, the prompt text
            built in Python (`make_interact_text`, `make_candidate_text`: 10 history
            titles, the target among 19 random negatives, shuffled), the frozen item codes
            (SASRec item embedding -> item encoder, no_grad) projected per sample, the
            user representation projected; the prompts and targets tokenised (padding to
            the longest), joined per sample (`concat_text_input_output`), the special
            tokens' embeddings overwritten by per-position Python loops
            (`replace_hist_candi_token`), the user vector prepended, the frozen LLM run on
            `inputs_embeds` with labels on the target tokens only, backward into the two
            projectors, Adam (lr 1e-4, betas 0.9 / 0.98).
  generate  `generate`: the same prompts without the target, left padding, the user
            vector prepended, `model.generate(inputs_embeds=...)` greedy with the
            original's repetition penalty 1.5 (with `inputs_embeds` transformers applies
            it to the new tokens only, in the original too); --ignore-eos makes every
            sequence run to --max-new-tokens (the worst case our evaluator is timed on).

Beside the timed sub-commands, `authors_*` functions redo the authors' arithmetic from
given weights and inputs (no sampling, no clock): the stage-1 losses and their gradients,
and the stage-2 assembled LM input and loss; tests/test_faithfulness.py compares the JAX
trainer's functions with them.

Deliberate differences from the original: the LLM is SmolLM2-135M-Instruct in float32 on
the CPU (the original: OPT-6.7B in 8 bit under CUDA autocast); the SBERT is
all-MiniLM-L6-v2 (384-d; the original: nq-distilbert-base-v1, 768-d); SASRec and the item
auto-encoder are randomly initialised (speed does not depend on their weights); MovieLens
has no descriptions, so an item text is its quoted title; a space follows "user
representation." (the original joins the two sentences without one); the target's first
token is dropped only when the tokenizer prepended a BOS (the original always drops it,
OPT's `</s>`); padding is read from the attention mask, so a pad token equal to EOS does
not hide the target's EOS. The sequence sampling of the original's DataLoader (negatives
per position) is done before the clock starts, as the JAX side fetches its batch untimed;
prompt building, candidate sampling and tokenisation are timed, as on our side.

Usage (one JSON line on stdout; errors as {"error": ...} with a non-zero exit):
  python benchmarks/torch_peer.py stage1 --batch-size 60 --data-dir DIR --sbert-path DIR \
      [--warmup 2 --iters 5 --threads 2]
  python benchmarks/torch_peer.py stage2 --llm smollm2 --llm-dir DIR --llm-gguf FILE \
      --data-dir DIR --batch-size 4 [--warmup 1 --iters 3 --threads 2]
  python benchmarks/torch_peer.py generate --llm smollm2 --llm-dir DIR --llm-gguf FILE \
      --data-dir DIR --batch-size 2 --ignore-eos --max-new-tokens 64

DIR for --data-dir holds `<dataset>.inter` and `<dataset>.item` (RecBole atomic files,
--dataset ml-100k). Loading a GGUF file needs the `gguf` and `accelerate` packages
(`pip install -e '.[bench]'`); it is converted once to a Hugging Face folder kept in
--llm-cache (default `$ALLMREC_CACHE/torch_peer`, else `~/.cache/allmrec_jax/torch_peer`).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
from torch import nn

MICRO_BATCH = 60          # users per SBERT micro-batch in pre_train_phase1
LATENT = 128              # auto-encoder latent width (the joint item code)
SPECIAL_TOKENS = ("[UserRep]", "[HistoryEmb]", "[CandidateEmb]")
NUM_HISTORY = 10
NUM_CANDIDATES = 20
NEG_POOL = 50             # make_candidate_text draws 50 negatives, then keeps 19
PROMPT_USER = " is a user representation. This user has watched "
PROMPT_MIDDLE = (" in the previous. Recommend one next movie for this user to watch next "
                 "from the following movie title set, ")
PROMPT_END = ". The recommendation is "


def fail(message: str, code: int = 2):
  """Prints the error as the JSON line the benchmarks read, and exits non-zero."""
  print(json.dumps({"error": message}), flush=True)
  sys.exit(code)


# ----------------------------------------------------------------------------- data
def _read_atomic(path: str) -> dict[str, list[str]]:
  """Columns of a RecBole atomic file (tab-separated, header `name:type`) by name."""
  with open(path, encoding="utf-8", errors="replace") as f:
    names = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
    rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
  return {n: [r[i] if i < len(r) else "" for r in rows] for i, n in enumerate(names)}


def _raw_id_key(s: str):
  return (0, int(s), s) if s.isdigit() else (1, 0, s)


class Interactions:
  """Per-user item sequences (time order) and item titles, ids re-indexed from 1.

  A single-pass >= min_count filter on users and items (as the original's preprocessing);
  the last item of a sequence is the test target, the one before it the validation
  target, the rest the training sequence (SASRec's `data_partition`).
  """

  def __init__(self, data_dir: str, dataset: str = "ml-100k", min_count: int = 5):
    inter = _read_atomic(os.path.join(data_dir, f"{dataset}.inter"))
    items = _read_atomic(os.path.join(data_dir, f"{dataset}.item"))
    users_raw, items_raw = inter["user_id"], inter["item_id"]
    stamps = [float(t or 0) for t in inter.get("timestamp", ["0"] * len(users_raw))]
    uc, ic = collections.Counter(users_raw), collections.Counter(items_raw)
    keep = [k for k in range(len(users_raw))
            if uc[users_raw[k]] >= min_count and ic[items_raw[k]] >= min_count]
    item_id = {r: i + 1 for i, r in enumerate(sorted({items_raw[k] for k in keep},
                                                     key=_raw_id_key))}
    by_user = collections.defaultdict(list)
    for k in keep:
      by_user[users_raw[k]].append((stamps[k], k, item_id[items_raw[k]]))
    self.sequences = [[it for _, _, it in sorted(v)]
                      for _, v in sorted(by_user.items(), key=lambda kv: _raw_id_key(kv[0]))]
    self.num_items = len(item_id)
    title_col = next(c for c in ("movie_title", "title", "item_name", "name") if c in items)
    raw_title = dict(zip(items["item_id"], items[title_col]))
    self.titles = ["No Title"] * (self.num_items + 1)
    for raw, i in item_id.items():
      self.titles[i] = raw_title.get(raw, "No Title") or "No Title"

  def train(self, u: int) -> list[int]:
    s = self.sequences[u]
    return s[:-2] if len(s) >= 3 else s

  def quoted(self, i: int) -> str:
    return f'"{self.titles[int(i)]}"'


def _sample_not_in(rng: np.random.Generator, num_items: int, taken) -> int:
  t = int(rng.integers(1, num_items + 1))
  while t in taken:
    t = int(rng.integers(1, num_items + 1))
  return t


def training_rows(ds: Interactions, users, maxlen: int, rng: np.random.Generator):
  """(seq, pos, neg) int64[B, maxlen] as the original's SeqDataset builds them: the training
  sequence shifted by one, left-padded, a negative per position outside the user's items."""
  b = len(users)
  seq, pos, neg = (np.zeros((b, maxlen), np.int64) for _ in range(3))
  for r, u in enumerate(users):
    train = ds.train(u)
    taken = set(train)
    nxt, idx = train[-1], maxlen - 1
    for i in reversed(train[:-1]):
      seq[r, idx], pos[r, idx] = i, nxt
      neg[r, idx] = _sample_not_in(rng, ds.num_items, taken)
      nxt, idx = i, idx - 1
      if idx < 0:
        break
  return seq, pos, neg


def inference_rows(ds: Interactions, users, maxlen: int):
  """(seq int64[B, maxlen] = training items + the validation item, target int64[B])."""
  seq = np.zeros((len(users), maxlen), np.int64)
  target = np.zeros((len(users),), np.int64)
  for r, u in enumerate(users):
    history = ds.sequences[u][:-1][-maxlen:]
    seq[r, maxlen - len(history):] = history
    target[r] = ds.sequences[u][-1]
  return seq, target


class UserStream:
  """Users in shuffled passes, `take(n)` at a time (a DataLoader with shuffle)."""

  def __init__(self, users, rng: np.random.Generator):
    self.users, self.rng, self.order = np.asarray(users), rng, []

  def take(self, n: int) -> list[int]:
    out = []
    while len(out) < n:
      if not len(self.order):
        self.order = list(self.rng.permutation(self.users))
      out.append(int(self.order.pop()))
    return out


# --------------------------------------------------------------------------- models
class SASRec(nn.Module):
  """Self-attentive sequential recommender (pre-LN blocks, as pre_train/sasrec/model.py)."""

  def __init__(self, num_items: int, dim: int = 50, blocks: int = 2, heads: int = 1,
               maxlen: int = 50, dropout: float = 0.5):
    super().__init__()
    self.dim = dim
    self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
    self.pos_emb = nn.Embedding(maxlen, dim)
    self.drop = nn.Dropout(dropout)
    self.attn_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-8) for _ in range(blocks))
    self.attns = nn.ModuleList(nn.MultiheadAttention(dim, heads, dropout=dropout,
                                                     batch_first=True)
                               for _ in range(blocks))
    self.ffn_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-8) for _ in range(blocks))
    # The original's point-wise feed-forward is two kernel-1 Conv1d: the same as Linear.
    self.ffns = nn.ModuleList(
        nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout), nn.ReLU(),
                      nn.Linear(dim, dim), nn.Dropout(dropout))
        for _ in range(blocks))
    self.out_norm = nn.LayerNorm(dim, eps=1e-8)

  def forward(self, seq: torch.Tensor) -> torch.Tensor:
    """int64[B, L] item ids (0 = padding) -> float[B, L, dim] position representations."""
    length = seq.shape[1]
    x = self.item_emb(seq) * self.dim ** 0.5 + self.pos_emb(torch.arange(length))[None]
    x = self.drop(x)
    pad = (seq == 0).unsqueeze(-1)
    x = x.masked_fill(pad, 0.0)
    future = ~torch.tril(torch.ones(length, length, dtype=torch.bool))
    for attn_norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms,
                                              self.ffns):
      q = attn_norm(x)
      a, _ = attn(q, x, x, attn_mask=future, need_weights=False)
      x = ffn_norm(q + a)
      x = (ffn(x) + x).masked_fill(pad, 0.0)
    return self.out_norm(x)


class AutoEncoder(nn.Module):
  """d -> 128 (sigmoid) -> d; returns (latent, reconstruction) (`two_layer_mlp`)."""

  def __init__(self, dim: int, latent: int = LATENT):
    super().__init__()
    self.enc = nn.Linear(dim, latent)
    self.dec = nn.Linear(latent, dim)

  def forward(self, x: torch.Tensor):
    z = torch.sigmoid(self.enc(x))
    return z, self.dec(z)


def projector(d_in: int, width: int, act: nn.Module) -> nn.Sequential:
  """Linear -> LayerNorm -> act -> Linear, xavier-normal weights (the stage-2 projectors)."""
  net = nn.Sequential(nn.Linear(d_in, width), nn.LayerNorm(width), act,
                      nn.Linear(width, width))
  nn.init.xavier_normal_(net[0].weight)
  nn.init.xavier_normal_(net[3].weight)
  return net


# ------------------------------------------------------- the authors' computation, pure
# For the faithfulness tests (tests/test_faithfulness.py): the authors' stage-1 losses and
# stage-2 LM input / loss from GIVEN weights and inputs, in float32, with nothing sampled
# or timed, so that the JAX trainer's functions can be compared with them number by number.
AUTHORS_TOKENS = {"pad_token": "[PAD]", "bos_token": "</s>", "eos_token": "</s>",
                  "unk_token": "</s>", "additional_special_tokens": list(SPECIAL_TOKENS)}


def authors_stage1_losses(item_ae: AutoEncoder, text_ae: AutoEncoder, user: torch.Tensor,
                          pos_emb: torch.Tensor, neg_emb: torch.Tensor,
                          pos_text: torch.Tensor, neg_text: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
  """One micro-batch of `pre_train_phase1` (models/a_llmrec_model.py) after SBERT.

  user: float[B, d] the SASRec state x_u; pos_emb / neg_emb: float[B, d] the SASRec item
  rows E_p / E_n; pos_text / neg_text: float[B, t] the SBERT sentence embeddings Q_p / Q_n
  (differentiable: SBERT is fine-tuned through them). As the authors: `two_layer_mlp` gives
  (sigmoid code, reconstruction); rec = BCEWithLogits (batch mean) of mean(user * recon)
  with labels 1 / 0; matching, item and text reconstruction are nn.MSELoss (mean over batch
  and features) summed over p and n; the text reconstruction target is `Q.data` (no
  gradient into SBERT through the target); total = rec + match + 0.5 item + 0.2 text.
  Returns {"rec", "match", "item_recon", "text_recon", "total"}: float[] tensors.
  """
  bce, mse = nn.BCEWithLogitsLoss(), nn.MSELoss()
  e_p, item_rec_p = item_ae(pos_emb)
  e_n, item_rec_n = item_ae(neg_emb)
  q_p, text_rec_p = text_ae(pos_text)
  q_n, text_rec_n = text_ae(neg_text)
  s_p = (user * item_rec_p).mean(dim=1)
  s_n = (user * item_rec_n).mean(dim=1)
  out = {
      "rec": bce(s_p, torch.ones_like(s_p)) + bce(s_n, torch.zeros_like(s_n)),
      "match": mse(e_p, q_p) + mse(e_n, q_n),
      "item_recon": mse(item_rec_p, pos_emb) + mse(item_rec_n, neg_emb),
      "text_recon": mse(text_rec_p, pos_text.data) + mse(text_rec_n, neg_text.data),
  }
  out["total"] = (out["rec"] + out["match"] + 0.5 * out["item_recon"]
                  + 0.2 * out["text_recon"])
  return out


def authors_stage1_reference(weights: dict[str, np.ndarray], user, pos_emb, neg_emb,
                             pos_text, neg_text) -> tuple[dict[str, float], dict]:
  """`authors_stage1_losses` from numpy weights and inputs, with the backward pass.

  weights: torch-layout tensors named "item_ae.enc.weight", "item_ae.enc.bias",
  "item_ae.dec.weight", ... and the same under "text_ae." (Linear weight [out, in]).
  Returns (the five values as floats, gradients as float32 numpy arrays: of every weight
  by its name, and of the SBERT outputs as "pos_text" / "neg_text").
  """
  def as_t(x):
    return torch.tensor(np.asarray(x, np.float32))

  aes = {}
  for name in ("item_ae", "text_ae"):
    enc = weights[f"{name}.enc.weight"]
    ae = AutoEncoder(enc.shape[1], enc.shape[0])
    ae.load_state_dict({k: as_t(weights[f"{name}.{k}"]) for k in ae.state_dict()})
    aes[name] = ae
  texts = [as_t(pos_text).requires_grad_(), as_t(neg_text).requires_grad_()]
  with torch.no_grad():    # the frozen SASRec's outputs (`recsys.model` under no_grad)
    user, pos_emb, neg_emb = as_t(user), as_t(pos_emb), as_t(neg_emb)
  out = authors_stage1_losses(aes["item_ae"], aes["text_ae"], user, pos_emb, neg_emb,
                              *texts)
  out["total"].backward()
  grads = {f"{name}.{k}": p.grad.numpy().copy()
           for name, ae in aes.items() for k, p in ae.named_parameters()}
  grads["pos_text"], grads["neg_text"] = (t.grad.numpy().copy() for t in texts)
  return {k: float(v.detach()) for k, v in out.items()}, grads


def authors_llm_setup(llm, tokenizer):
  """`llm4rec.__init__` after loading OPT: [PAD] as the pad token, </s> as BOS, EOS and
  UNK, [UserRep] / [HistoryEmb] / [CandidateEmb] added as special tokens, the embedding
  table resized to the new vocabulary (new rows drawn by transformers' resize), all frozen.
  Changes both in place and returns them."""
  tokenizer.add_special_tokens(dict(AUTHORS_TOKENS))
  llm.resize_token_embeddings(len(tokenizer))
  for p in llm.parameters():
    p.requires_grad_(False)
  llm.eval()
  return llm, tokenizer


def authors_prompt_text(titles, history, candidates, space_after_user: bool = False) -> str:
  """The movies prompt of `pre_train_phase2` for given history and candidate ids (in their
  prompt order): `make_interact_text` (`"title"[HistoryEmb]` joined by ",") and
  `make_candidate_text` (`"title"[CandidateEmb]` joined by ","). The authors write
  "...representation.This user..." (no space); `space_after_user` puts the space the JAX
  template has (and PROMPT_USER above)."""
  hist = ",".join(f'"{titles[int(i)]}"[HistoryEmb]' for i in history)
  cands = ",".join(f'"{titles[int(i)]}"[CandidateEmb]' for i in candidates)
  user = PROMPT_USER if space_after_user else PROMPT_USER.replace(". ", ".", 1)
  return user + hist + PROMPT_MIDDLE + cands + PROMPT_END


def authors_stage2_forward(llm, tokenizer, item_proj: nn.Module, user_proj: nn.Module,
                           user_reps: torch.Tensor, hist_codes, cand_codes, prompts,
                           target_titles) -> dict[str, torch.Tensor]:
  """`pre_train_phase2` from its prompts on + `llm4rec.forward`, on an `authors_llm_setup` LLM.

  user_reps: float[B, d] x_u; hist_codes / cand_codes: per sample float[n, 128] the joint
  codes of the items behind its [HistoryEmb] / [CandidateEmb] tokens, in prompt order;
  prompts: the prompt texts; target_titles: the target titles (unquoted). As the authors:
  inputs and `"title"</s>` targets tokenised separately (right padding, to the longest);
  per sample the prompt's real tokens, the target's tokens without its first (OPT's
  leading </s>), then the padding; labels -100 on the prompt and wherever the id is the pad
  id; embeddings of the joined ids with each [HistoryEmb] / [CandidateEmb] position
  overwritten, in order, by F_I of its item; F_U(x_u) concatenated in FRONT of the whole
  sequence (before </s>), with attention 1 and label -100; the LM's mean token loss.
  Returns {"input_ids" [B, L] (joined, without the user slot), "inputs_embeds" [B, 1+L, H],
  "attention_mask" [B, 1+L], "labels" [B, 1+L], "logits" [B, 1+L, V], "loss" []}.
  """
  tokenizer.padding_side = "right"
  out = tokenizer([f'"{t}"' + tokenizer.eos_token for t in target_titles],
                  return_tensors="pt", padding="longest", truncation=False)
  inp = tokenizer(list(prompts), return_tensors="pt", padding="longest", truncation=False)
  ids, att, prompt_lens = [], [], []
  for i in range(inp.input_ids.shape[0]):       # concat_text_input_output
    n = int(inp.attention_mask[i].sum())
    prompt_lens.append(n)
    ids.append(torch.cat([inp.input_ids[i][:n], out.input_ids[i][1:], inp.input_ids[i][n:]]))
    att.append(torch.cat([inp.attention_mask[i][:n], out.attention_mask[i][1:],
                          inp.attention_mask[i][n:]]))
  ids, att = torch.stack(ids), torch.stack(att)
  labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
  for i, n in enumerate(prompt_lens):
    labels[i][:n] = -100
  b = ids.shape[0]
  labels = torch.cat([torch.full((b, 1), -100, dtype=labels.dtype), labels], dim=1)
  emb = llm.get_input_embeddings()(ids)
  slot = {"[HistoryEmb]": [item_proj(torch.as_tensor(c)) for c in hist_codes],
          "[CandidateEmb]": [item_proj(torch.as_tensor(c)) for c in cand_codes]}
  for token, vecs in slot.items():                # replace_hist_candi_token
    token_id = tokenizer(token, return_tensors="pt", add_special_tokens=False).input_ids.item()
    for i in range(b):
      for p, v in zip((ids[i] == token_id).nonzero().view(-1), vecs[i]):
        emb[i][p] = v
  user = user_proj(torch.as_tensor(user_reps)).unsqueeze(1)
  emb = torch.cat([user, emb], dim=1)
  att = torch.cat([torch.ones(b, 1, dtype=att.dtype), att], dim=1)
  res = llm(inputs_embeds=emb, attention_mask=att, labels=labels, return_dict=True)
  return {"input_ids": ids, "inputs_embeds": emb, "attention_mask": att, "labels": labels,
          "logits": res.logits, "loss": res.loss}


# -------------------------------------------------------------------------- timing
def _busy_seconds() -> float | None:
  """Busy CPU seconds of the whole machine so far (user+nice+system+irq+softirq)."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      v = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
  t = os.times()
  return t.user + t.system


class MachineLoad:
  """CPU cores used by OTHER processes on average over a window, and the load average."""

  def start(self):
    self.busy0, self.own0, self.t0 = _busy_seconds(), _own_seconds(), time.time()

  def stop(self) -> dict:
    busy, wall = _busy_seconds(), max(time.time() - self.t0, 1e-9)
    out = {"cpu_count": os.cpu_count(), "window_s": round(wall, 2)}
    if busy is not None and self.busy0 is not None:
      other = (busy - self.busy0) - (_own_seconds() - self.own0)
      out["other_procs_cpu_cores_mean"] = round(max(other, 0.0) / wall, 3)
    try:
      out["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
      out["loadavg_1m_at_end"] = None
    return out


def run_timed(make_input, step, warmup: int, iters: int):
  """Calls `step(make_input(i))` warmup + iters times; `make_input` is not timed.

  Returns (seconds of the timed steps, their results, the machine load over them).
  """
  times, results, load = [], [], MachineLoad()
  for i in range(warmup + iters):
    if i == warmup:
      load.start()
    x = make_input(i)
    t = time.perf_counter()
    r = step(x)
    dt = time.perf_counter() - t
    if i >= warmup:
      times.append(dt)
      results.append(r)
  return times, results, load.stop()


def summary(xs: list[float]) -> dict:
  if not xs:
    return {"median": None, "min": None, "max": None, "mean": None, "values": []}
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
          "mean": statistics.fmean(xs), "values": xs}


# -------------------------------------------------------------------------- stage 1
def cmd_stage1(args) -> dict:
  try:
    from sentence_transformers import SentenceTransformer
  except ImportError as e:
    fail(f"sentence-transformers is needed for stage1: {e}")
  ds = Interactions(args.data_dir, args.dataset)
  rng = np.random.default_rng(args.seed)
  cf = SASRec(ds.num_items, maxlen=args.maxlen)
  for p in cf.parameters():
    p.requires_grad_(False)
  cf.train()                                 # the original's model.train(): dropout on
  sbert = SentenceTransformer(os.path.expanduser(args.sbert_path), device="cpu")
  sbert.train()
  # sentence-transformers >= 5 renamed `tokenize` / `get_sentence_embedding_dimension`.
  tokenize = getattr(sbert, "preprocess", None) or sbert.tokenize
  text_dim = (getattr(sbert, "get_embedding_dimension", None)
              or sbert.get_sentence_embedding_dimension)()
  item_ae, text_ae = AutoEncoder(cf.dim), AutoEncoder(text_dim)
  params = [*sbert.parameters(), *item_ae.parameters(), *text_ae.parameters()]
  opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.98))
  bce, mse = nn.BCEWithLogitsLoss(), nn.MSELoss()
  stream = UserStream([u for u in range(len(ds.sequences)) if len(ds.train(u)) >= 2], rng)
  text_lens = []

  def make_input(_):
    return training_rows(ds, stream.take(args.batch_size), args.maxlen, rng)

  def step(batch):
    seq, pos, neg = (torch.from_numpy(a) for a in batch)
    opt.zero_grad()                          # once per step: micro-batches accumulate
    with torch.no_grad():
      feats = cf(seq)
      pos_all, neg_all = cf.item_emb(pos), cf.item_emb(neg)
    user, pos_e, neg_e = feats[:, -1], pos_all[:, -1], neg_all[:, -1]
    pos_ids, neg_ids = batch[1][:, -1], batch[2][:, -1]
    total_losses = []
    for s in range(0, user.shape[0], MICRO_BATCH):
      sl = slice(s, s + MICRO_BATCH)
      text_emb = []
      for ids in (pos_ids[sl], neg_ids[sl]):
        tok = tokenize([ds.quoted(i) for i in ids])
        text_lens.append(int(tok["input_ids"].shape[1]))
        text_emb.append(sbert({"input_ids": tok["input_ids"],
                               "attention_mask": tok["attention_mask"]})["sentence_embedding"])
      pos_t, neg_t = text_emb
      pos_z, pos_rec = item_ae(pos_e[sl])
      neg_z, neg_rec = item_ae(neg_e[sl])
      pos_tz, pos_trec = text_ae(pos_t)
      neg_tz, neg_trec = text_ae(neg_t)
      u = user[sl]
      pos_logit, neg_logit = (u * pos_rec).mean(dim=1), (u * neg_rec).mean(dim=1)
      rec = (bce(pos_logit, torch.ones_like(pos_logit))
             + bce(neg_logit, torch.zeros_like(neg_logit)))
      matching = mse(pos_z, pos_tz) + mse(neg_z, neg_tz)
      item_recon = mse(pos_rec, pos_e[sl]) + mse(neg_rec, neg_e[sl])
      text_recon = mse(pos_trec, pos_t.detach()) + mse(neg_trec, neg_t.detach())
      total = rec + matching + 0.5 * item_recon + 0.2 * text_recon
      total.backward()
      opt.step()
      total_losses.append(total.item())
      for part in (rec, matching, item_recon, text_recon):
        part.item()                          # the original reads every loss back
    return statistics.fmean(total_losses)

  times, losses, load = run_timed(make_input, step, args.warmup, args.iters)
  med = statistics.median(times) if times else float("nan")
  return {"peer": "stage1", "batch_size": args.batch_size, "micro_batch": MICRO_BATCH,
          "threads": torch.get_num_threads(), "users_per_s": args.batch_size / med,
          "item_texts_per_s": 2 * args.batch_size / med, "step_s": summary(times),
          "text_tokens_max": max(text_lens) if text_lens else None,
          "loss_first_last": [losses[0], losses[-1]] if losses else None,
          "text_dim": text_dim, "num_items": ds.num_items, "torch": torch.__version__,
          "machine_load": load}


# -------------------------------------------------------------------------- stage 2
def _converted_gguf(llm_dir: str, gguf: str, cache: str) -> str:
  """A Hugging Face folder (float32 safetensors, tokenizer) converted from `gguf` once and
  kept in `cache` under the file's sha256: transformers parses a GGUF file three times
  (tokenizer, config, weights; ~30 s for SmolLM2-135M on a CPU), a saved folder loads in
  a second. Written to a temporary folder and renamed, so a reader never sees half of it."""
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path = os.path.join(llm_dir, gguf)
  if not os.path.isfile(path):
    fail(f"--llm-gguf={gguf}: no such file in --llm-dir={llm_dir}")
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  out = os.path.join(cache, f"{os.path.splitext(gguf)[0]}-{digest.hexdigest()[:16]}")
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
  if missing:
    fail(f"loading {gguf} with transformers needs {' and '.join(missing)} "
         "(pip install -e '.[bench]')")
  os.makedirs(cache, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=cache, prefix=".converting-")
  try:
    AutoTokenizer.from_pretrained(llm_dir, gguf_file=gguf).save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, gguf_file=gguf, dtype=torch.float32)
    # The weights are float32 already (dequantised on load); transformers still marks the
    # model as GGUF-quantised and refuses to save it. Saved as the plain model it now is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
      del model.config.quantization_config
    model.save_pretrained(tmp)
    try:
      os.rename(tmp, out)
    except OSError:              # another process converted it meanwhile: use theirs
      if not os.path.isfile(os.path.join(out, "config.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def load_llm(args):
  """(model, tokenizer): frozen, float32, the three special tokens added (llm4rec.py)."""
  llm_dir = os.path.expanduser(args.llm_dir)
  if args.llm_gguf:
    llm_dir = _converted_gguf(llm_dir, args.llm_gguf, os.path.expanduser(args.llm_cache))
  from transformers import AutoModelForCausalLM, AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(llm_dir)
  model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
  if tokenizer.pad_token is None:
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
  tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
  model.resize_token_embeddings(len(tokenizer))
  for p in model.parameters():
    p.requires_grad_(False)
  model.eval()
  return model, tokenizer


class Stage2Peer:
  """The stage-2 pieces: frozen SASRec + item encoder + LLM, trainable projectors."""

  def __init__(self, args, ds: Interactions):
    self.ds, self.rng = ds, np.random.default_rng(args.seed)
    self.llm, self.tok = load_llm(args)
    width = self.llm.get_input_embeddings().embedding_dim
    self.cf = SASRec(ds.num_items, maxlen=args.maxlen)
    self.item_ae = AutoEncoder(self.cf.dim)
    for p in [*self.cf.parameters(), *self.item_ae.parameters()]:
      p.requires_grad_(False)
    self.cf.train()
    self.item_proj = projector(LATENT, width, nn.GELU())
    self.user_proj = projector(self.cf.dim, width, nn.LeakyReLU())
    self.hist_id = self.tok.convert_tokens_to_ids("[HistoryEmb]")
    self.cand_id = self.tok.convert_tokens_to_ids("[CandidateEmb]")

  def item_codes(self, ids) -> torch.Tensor:
    """float[n, 128]: the frozen joint item codes (`get_item_emb`)."""
    with torch.no_grad():
      z, _ = self.item_ae(self.cf.item_emb(torch.as_tensor(np.asarray(ids, np.int64))))
    return z

  def prompt(self, history, target: int):
    """Prompt text, history ids and candidate ids (make_interact/candidate_text)."""
    history = [int(i) for i in history]
    shown = history[-NUM_HISTORY:]
    hist_text = ",".join(self.ds.quoted(i) + "[HistoryEmb]" for i in shown)
    negs = []
    while len(negs) < NEG_POOL:
      t = int(self.rng.integers(1, self.ds.num_items + 1))
      if t not in history and t not in negs:
        negs.append(t)
    self.rng.shuffle(negs)
    cands = np.array([target] + negs[:NUM_CANDIDATES - 1])[self.rng.permutation(NUM_CANDIDATES)]
    cand_text = ",".join(self.ds.quoted(i) + "[CandidateEmb]" for i in cands)
    return PROMPT_USER + hist_text + PROMPT_MIDDLE + cand_text + PROMPT_END, shown, cands

  def prompts(self, seq: np.ndarray, targets: np.ndarray):
    texts, hist_embs, cand_embs = [], [], []
    for row, target in zip(seq, targets):
      text, shown, cands = self.prompt(row[row > 0], int(target))
      texts.append(text)
      hist_embs.append(self.item_proj(self.item_codes(shown)))
      cand_embs.append(self.item_proj(self.item_codes(cands)))
    return texts, hist_embs, cand_embs

  def embed(self, ids: torch.Tensor, hist_embs, cand_embs) -> torch.Tensor:
    """Token embeddings with the [HistoryEmb]/[CandidateEmb] positions overwritten."""
    emb = self.llm.get_input_embeddings()(ids)
    for i in range(ids.shape[0]):
      for p, e in zip((ids[i] == self.hist_id).nonzero().view(-1), hist_embs[i]):
        emb[i][p] = e
      for p, e in zip((ids[i] == self.cand_id).nonzero().view(-1), cand_embs[i]):
        emb[i][p] = e
    return emb

  def train_inputs(self, prompts, targets):
    """(input_ids, attention_mask, labels) with each target right after its prompt."""
    self.tok.padding_side = "right"
    out = self.tok([self.ds.quoted(t) + self.tok.eos_token for t in targets],
                   return_tensors="pt", padding="longest", truncation=False)
    inp = self.tok(prompts, return_tensors="pt", padding="longest", truncation=False)
    bos = self.tok.bos_token_id
    skip = int(bos is not None and bool((out.input_ids[:, 0] == bos).all()))
    ids, att, prompt_lens = [], [], []
    for i in range(inp.input_ids.shape[0]):
      n = int(inp.attention_mask[i].sum())
      prompt_lens.append(n)
      ids.append(torch.cat([inp.input_ids[i][:n], out.input_ids[i][skip:],
                            inp.input_ids[i][n:]]))
      att.append(torch.cat([inp.attention_mask[i][:n], out.attention_mask[i][skip:],
                            inp.attention_mask[i][n:]]))
    ids, att = torch.stack(ids), torch.stack(att)
    labels = ids.masked_fill(att == 0, -100)
    for i, n in enumerate(prompt_lens):
      labels[i][:n] = -100
    return ids, att, labels


def cmd_stage2(args) -> dict:
  ds = Interactions(args.data_dir, args.dataset)
  peer = Stage2Peer(args, ds)
  params = [*peer.item_proj.parameters(), *peer.user_proj.parameters()]
  opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.98))
  stream = UserStream([u for u in range(len(ds.sequences)) if len(ds.train(u)) >= 2], peer.rng)
  counts = []

  def make_input(_):
    return training_rows(ds, stream.take(args.batch_size), args.maxlen, peer.rng)

  def step(batch):
    seq, pos, _ = batch
    opt.zero_grad()
    with torch.no_grad():
      user = peer.cf(torch.from_numpy(seq))[:, -1]
    targets = pos[:, -1]
    texts, hist_embs, cand_embs = peer.prompts(seq, targets)
    user = peer.user_proj(user).unsqueeze(1)
    ids, att, labels = peer.train_inputs(texts, targets)
    emb = peer.embed(ids, hist_embs, cand_embs)
    b = ids.shape[0]
    emb = torch.cat([user, emb], dim=1)
    att = torch.cat([torch.ones(b, 1, dtype=att.dtype), att], dim=1)
    labels = torch.cat([torch.full((b, 1), -100, dtype=labels.dtype), labels], dim=1)
    loss = peer.llm(inputs_embeds=emb, attention_mask=att, labels=labels,
                    return_dict=True).loss
    loss.backward()
    opt.step()
    counts.append((int(att.sum()), int(att.numel())))
    return loss.item()

  times, losses, load = run_timed(make_input, step, args.warmup, args.iters)
  timed = counts[len(counts) - len(times):]
  nonpad = [c[0] for c in timed]
  med = statistics.median(times) if times else float("nan")
  return {"peer": "stage2", "llm": args.llm, "batch_size": args.batch_size,
          "threads": torch.get_num_threads(),
          "nonpad_tokens_per_s": statistics.fmean(nonpad) / med if nonpad else None,
          "nonpad_tokens_per_step": statistics.fmean(nonpad) if nonpad else None,
          "padded_tokens_per_step": statistics.fmean(c[1] for c in timed) if timed else None,
          "step_s": summary(times),
          "loss_first_last": [losses[0], losses[-1]] if losses else None,
          "torch": torch.__version__, "machine_load": load}


def cmd_generate(args) -> dict:
  ds = Interactions(args.data_dir, args.dataset)
  peer = Stage2Peer(args, ds)
  users = [u for u in range(len(ds.sequences)) if len(ds.sequences[u]) >= 3]
  stream = UserStream(users, peer.rng)
  new_tokens = []

  def make_input(_):
    return inference_rows(ds, stream.take(args.batch_size), args.maxlen)

  def step(batch):
    seq, targets = batch
    with torch.no_grad():
      user = peer.cf(torch.from_numpy(seq))[:, -1]
      texts, hist_embs, cand_embs = peer.prompts(seq, targets)
      user = peer.user_proj(user).unsqueeze(1)
      peer.tok.padding_side = "left"
      inp = peer.tok(texts, return_tensors="pt", padding="longest")
      emb = peer.embed(inp.input_ids, hist_embs, cand_embs)
      b = emb.shape[0]
      emb = torch.cat([user, emb], dim=1)
      att = torch.cat([torch.ones(b, 1, dtype=inp.attention_mask.dtype), inp.attention_mask],
                      dim=1)
      extra = {"min_new_tokens": args.max_new_tokens} if args.ignore_eos else {}
      out = peer.llm.generate(inputs_embeds=emb, attention_mask=att, do_sample=False,
                              num_beams=1, max_new_tokens=args.max_new_tokens,
                              repetition_penalty=args.repetition_penalty,
                              pad_token_id=peer.tok.pad_token_id, **extra)
      texts = [t.strip() for t in peer.tok.batch_decode(out, skip_special_tokens=True)]
    new_tokens.append(int(out.shape[1]))
    return texts

  times, outputs, load = run_timed(make_input, step, args.warmup, args.iters)
  med = statistics.median(times) if times else float("nan")
  return {"peer": "generate", "llm": args.llm, "batch_size": args.batch_size,
          "threads": torch.get_num_threads(), "ignore_eos": bool(args.ignore_eos),
          "max_new_tokens": args.max_new_tokens,
          "new_tokens": new_tokens[len(new_tokens) - len(times):],
          "users_per_s": args.batch_size / med, "s_per_user_median": med / args.batch_size,
          "step_s": summary(times),
          "sample_output": outputs[-1][0][:200] if outputs else None,
          "torch": torch.__version__, "machine_load": load}


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="command", required=True)

  def common(p, batch, warmup, iters):
    p.add_argument("--data-dir", required=True, help="folder of <dataset>.inter/.item")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    p.add_argument("--iters", type=int, default=iters, help="timed steps")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--maxlen", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)

  def llm(p):
    p.add_argument("--llm", default="smollm2", help="a label for the report")
    p.add_argument("--llm-dir", required=True, help="HF model folder, or the GGUF's folder")
    p.add_argument("--llm-gguf", default="", help="GGUF file name inside --llm-dir")
    p.add_argument("--llm-cache", default=os.path.join(
        os.environ.get("ALLMREC_CACHE", "~/.cache/allmrec_jax"), "torch_peer"),
                   help="where a GGUF file's conversion to a Hugging Face folder is kept")

  p1 = sub.add_parser("stage1", help="pre_train_phase1 steps")
  common(p1, 60, 2, 5)
  p1.add_argument("--sbert-path", required=True, help="sentence-transformers folder")
  p1.add_argument("--lr", type=float, default=1e-4)
  p2 = sub.add_parser("stage2", help="pre_train_phase2 steps")
  common(p2, 4, 1, 3)
  llm(p2)
  p2.add_argument("--lr", type=float, default=1e-4)
  p3 = sub.add_parser("generate", help="inference (generate) batches")
  common(p3, 2, 1, 3)
  llm(p3)
  p3.add_argument("--max-new-tokens", type=int, default=64)
  p3.add_argument("--ignore-eos", action="store_true", help="always generate all tokens")
  p3.add_argument("--repetition-penalty", type=float, default=1.5)
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  args.data_dir = os.path.expanduser(args.data_dir)
  if args.batch_size < 1 or args.warmup < 0 or args.iters < 1:
    fail("need --batch-size >= 1, --warmup >= 0 and --iters >= 1")
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  run = {"stage1": cmd_stage1, "stage2": cmd_stage2, "generate": cmd_generate}[args.command]
  try:
    result = run(args)
  except Exception as e:  # any failure becomes the JSON error line
    traceback.print_exc()
    fail(f"{type(e).__name__}: {e}")
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
