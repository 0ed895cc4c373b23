"""Evaluation of stage 2 and its baselines on one fixed set of users and candidates.

Every model (the CF backbone, LLM-Only, MLP-LLM, A-LLMRec) is scored on the same
`EvalSet`: the stored 20 candidates per user (column 0 = target), shown to the LLM in a
fixed seeded order. Two LLM protocols:

- ranking: log p(candidate answer | prompt) for each of the 20 candidates ('"title"' +
  EOS), the prompt run once per user, the candidates scored against its KV cache in one
  packed pass (and, when both protocols run, greedy decoding continues from that same
  prefill: `scoring.rank_and_generate_fn`) -> `hit@k`, `ndcg@k`, `mrr`; the length-normalised score (mean token
  log-prob) gives the same metrics with the suffix `_lnorm`;
- generation (the paper's): greedy decoding; `gen_hit@1` = the normalised target title
  occurs in the normalised generated text.

With several processes (and the evaluator given the run's mesh) each LLM step runs one
global batch: every process builds the prompts of the whole group of users (one prompt
width), places its own rows (`sharding.put_batch(process_local=True)`), and the scores /
generated ids are gathered (`process_allgather`), so that each user is scored once and every
process holds every result. The CF scores (`cf_scores`) stay replicated: every process
scores every user (a small model).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from allmrec_jax import common_types as ct
from allmrec_jax import generate as generate_lib
from allmrec_jax import metrics as metrics_lib
from allmrec_jax import scoring as scoring_lib
from allmrec_jax import sharding
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import prompts as prompts_lib
from allmrec_jax.data import sampling
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import soft_prompt

RANK_KS = (1, 3, 5, 10)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """users int32[B]; seq int32[B, maxlen] CF input; history int32[B, H];
  candidates int32[B, C] (column 0 = target); order int32[B, C] the prompt order
  (prompt slot j shows candidates[b, order[b, j]]); targets int32[B]."""
  users: np.ndarray
  seq: np.ndarray
  history: np.ndarray
  candidates: np.ndarray
  order: np.ndarray

  @property
  def targets(self) -> np.ndarray:
    return self.candidates[:, 0]

  @property
  def prompt_candidates(self) -> np.ndarray:
    return np.take_along_axis(self.candidates, self.order, axis=1)

  def unpermute(self, prompt_scores: np.ndarray) -> np.ndarray:
    """float[B, C] scores in prompt order -> candidate order (target in column 0)."""
    out = np.empty_like(prompt_scores)
    np.put_along_axis(out, self.order, prompt_scores, axis=1)
    return out

  def take(self, idx) -> EvalSet:
    return EvalSet(self.users[idx], self.seq[idx], self.history[idx],
                   self.candidates[idx], self.order[idx])


def make_eval_set(ds: dataset_lib.RecDataset, split: str, *, maxlen: int, num_history: int,
                  max_users: int, seed: int, users: np.ndarray | None = None) -> EvalSet:
  """The users with a `split` target (a seeded subset of `max_users` when there are more),
  their CF input, prompt history and stored candidates in a seeded prompt order."""
  all_users = ds.eval_users(split) if users is None else np.asarray(users, np.int32)
  if 0 < max_users < len(all_users):
    keys = sampling.hash_u64(31, seed, all_users)
    all_users = np.sort(all_users[np.argsort(keys, kind="stable")[:max_users]])
  seq = ds.history_matrix(split, maxlen)[all_users]
  return eval_set(all_users, seq, seq[:, -num_history:], ds.candidates(split)[all_users],
                  seed)


def eval_set(users: np.ndarray, seq: np.ndarray, history: np.ndarray,
             candidates: np.ndarray, seed: int) -> EvalSet:
  """An EvalSet of these rows (candidates: column 0 = target), shown in a seeded prompt
  order keyed by user id."""
  users = np.asarray(users, np.int32)
  order = np.argsort(sampling.hash_u64(32, seed, users[:, None],
                                       np.arange(candidates.shape[1])[None, :]), axis=1,
                     kind="stable").astype(np.int32)
  return EvalSet(users, np.asarray(seq, np.int32), np.asarray(history, np.int32),
                 np.asarray(candidates, np.int32), order)


def cf_scores(cf_model, cf_params, es: EvalSet, batch: int = 1024) -> np.ndarray:
  """float[B, C] the CF backbone's scores of the candidates (candidate order); not split
  over processes (each process scores every user)."""
  return np.concatenate([np.asarray(cf_score(cf_model, cf_params, es.seq[i:i + batch],
                                               es.candidates[i:i + batch]))
                         for i in range(0, len(es.users), batch)], 0)


@functools.partial(jax.jit, static_argnums=0)
def cf_score(cf_model, cf_params, seq, items):
  """float[B, C]: the CF model's scores of items int[B, C] after sequences int[B, L]."""
  return cf_model.apply(cf_params, seq, items, method=cf_model.score)


def popularity_scores(ds: dataset_lib.RecDataset, es: EvalSet) -> np.ndarray:
  """float[B, C]: each candidate's number of training interactions (ties broken against
  the target: the target must be strictly more popular to rank first)."""
  starts, ends = ds.train_bounds()
  items = np.concatenate([ds.seq_items[s:e] for s, e in zip(starts, ends)])
  counts = np.bincount(items, minlength=ds.num_items + 1).astype(np.float64)
  return counts[es.candidates]


def ranking_metrics(scores: np.ndarray, prefix: str, suffix: str = "") -> dict[str, float]:
  return metrics_lib.ranking_metrics(np.asarray(scores, np.float64), RANK_KS, prefix,
                                     suffix=suffix)


class LLMEvaluator:
  """Ranks candidates by likelihood and generates answers with one frozen LLM; built once
  per model shape, called with the trained params it scores (`evaluate(params, ...)`).

  Args:
    llm, llm_params: the decoder and {"params": ...}.
    tokenizer: decodes generated ids.
    builder: the PromptBuilder of the dataset.
    titles: item titles (for the generation match).
    projectors, item_table: the soft-prompt parts (None for LLM-Only).
    soft: A-LLMRec prompt with soft tokens (False: the plain text prompt of LLM-Only).
    mesh: the run's mesh; with several processes, each step's users are split over its data
      axes (`process_rows`). None: every process scores every user.

  The params of a call: {"params": projectors} (+ {"lora": adapters}) of a soft model,
  {"lora": adapters} of TALLRec, None for LLM-Only.
  """

  def __init__(self, *, llm, llm_params, tokenizer, builder: prompts_lib.PromptBuilder,
               titles, projectors=None, item_table=None, soft=True,
               use_user=True, use_items=True, batch_size=8, max_new_tokens=64,
               repetition_penalty=1.5, eos_ids=None, mesh=None):
    self.llm, self.llm_params, self.tokenizer = llm, llm_params, tokenizer
    self.mesh = mesh
    self._step, self._rows = process_rows(mesh, batch_size)
    self.builder, self.titles, self.soft = builder, titles, soft
    self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
    self.repetition_penalty = repetition_penalty
    self.eos_ids = eos_ids if eos_ids is not None else (tokenizer.eos_token_id,)
    self.item_table = None if item_table is None else jnp.asarray(item_table, jnp.float32)
    use_user, use_items = use_user and soft, use_items and soft

    def embeds_fn(proj_params, llm_params, item_table, batch):
      if projectors is None:
        return llm.apply(llm_params, batch["input_ids"], method=llm.embed)
      return soft_prompt.soft_prompt_embeds(llm, llm_params, projectors, proj_params,
                                            item_table, batch, use_user=use_user,
                                            use_items=use_items)

    def score_fn(proj_params, llm_params, item_table, batch, cont_ids, cont_mask, *,
                 packed_len):
      embeds = embeds_fn(proj_params, llm_params, item_table, batch)
      llm_vars = lora_lib.with_adapters(llm_params, proj_params)
      return scoring_lib.score_continuations_fn(llm, llm_vars, None, embeds,
                                                 batch["attention_mask"], cont_ids,
                                                 cont_mask, packed_len=packed_len)

    def rank_generate_fn(proj_params, llm_params, item_table, batch, cont_ids, cont_mask,
                         eos, options, *, packed_len):
      embeds = embeds_fn(proj_params, llm_params, item_table, batch)
      return scoring_lib.rank_and_generate_fn(
          llm, lora_lib.with_adapters(llm_params, proj_params), None, embeds, batch["attention_mask"], cont_ids, cont_mask, eos,
          options, jax.random.PRNGKey(0), max_new_tokens=max_new_tokens,
          pad_id=int(tokenizer.pad_token_id), packed_len=packed_len)

    self._embeds = jax.jit(embeds_fn)
    self._score = jax.jit(score_fn, static_argnames=("packed_len",))
    self._rank_generate = jax.jit(rank_generate_fn, static_argnames=("packed_len",))
    self._gen_options = generate_lib.generation_options(
        self.eos_ids, repetition_penalty=repetition_penalty)

  def _batch(self, es: EvalSet, user_rep: np.ndarray | None, task: str,
             permute_items_seed: int | None = None, min_prompt_len: int = 0) -> dict:
    """Host arrays of `es`'s `task` prompts (one width for all its rows)."""
    cands = es.prompt_candidates if task == "recommend" else None
    pb = self.builder.build(es.history, cands, None, soft=self.soft, padding="left",
                            task=task, min_len=min_prompt_len).arrays()
    pb["user_rep"] = (np.zeros((len(es.users), 1), np.float32) if user_rep is None
                      else user_rep.astype(np.float32))
    if permute_items_seed is not None:
      pb["item_ids"] = permute_slots(pb["item_ids"], permute_items_seed, es.users)
    return pb

  def _inputs(self, sub: EvalSet, arrays: dict) -> dict:
    """Host arrays of the step's users `sub` -> the jitted functions' inputs: all rows on
    the default device (one process), or this process's rows of the global batch. (`sub`
    names the users of the rows, for a caller that records which ones a process runs.)"""
    if self._rows is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    return sharding.put_batch(self.mesh, {k: v[self._rows] for k, v in arrays.items()},
                              process_local=True)

  def _fetch(self, tree):
    """Device outputs -> numpy arrays of all the step's rows (gathered from the processes
    when they are split)."""
    if self._rows is None:
      return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        tree)

  def _steps(self, es: EvalSet, user_rep: np.ndarray | None, desc: str):
    """Yields (users, x_u, real count) of each step, padded to the step's size by repeating
    row 0 (static shapes)."""
    size = self._step
    for i in tqdm.trange(0, len(es.users), size, desc=desc, leave=False):
      sub = es.take(slice(i, i + size))
      rep = None if user_rep is None else user_rep[i:i + size]
      n = len(sub.users)
      if n < size:
        idx = np.concatenate([np.arange(n), np.zeros(size - n, np.int64)])
        sub, rep = sub.take(idx), (None if rep is None else rep[idx])
      yield sub, rep, n

  def evaluate(self, params, es: EvalSet, user_rep: np.ndarray | None, *,
               rank: bool = True, generate: bool = True, desc: str = "eval",
               permute_items_seed: int | None = None, min_prompt_len: int = 0,
               min_packed_len: int = 0) -> dict[str, Any]:
    """Scores model `params` on `es`: {"scores": float[B,C], "scores_lnorm": ...,
    "texts": [str], "gen_hit": float[B]} (candidate order: the target is column 0).

    `permute_items_seed`: each prompt's item tokens permuted among its slots (a
    diagnostic). Shape floors (0 = none): prompts padded to at least `min_prompt_len`
    tokens and the packed candidate answers to at least `min_packed_len`, so that a caller
    whose inputs vary (recommend) runs one compiled program."""
    sums, means, texts = [], [], []
    for sub, rep, n in self._steps(es, user_rep, desc):
      arrays = self._batch(sub, rep, "recommend", permute_items_seed, min_prompt_len)
      if rank:
        cont_ids, cont_mask = self.builder.continuations(sub.prompt_candidates,
                                                            soft=self.soft)
        packed = self.packed_len(cont_mask, min_packed_len)
        batch = self._inputs(sub, {**arrays, "cont_ids": cont_ids, "cont_mask": cont_mask})
        cont = batch.pop("cont_ids"), batch.pop("cont_mask")
        args = (params, self.llm_params, self.item_table, batch, *cont)
        if generate:   # one prompt prefill serves both protocols
          s, cnt, out = self._fetch(self._rank_generate(*args, *self._gen_options,
                                                        packed_len=packed))
          texts.extend(self._decode(out)[:n])
        else:
          s, cnt = self._fetch(self._score(*args, packed_len=packed))
        s, cnt = s[:n], cnt[:n]
        sums.append(sub.take(slice(0, n)).unpermute(s))
        means.append(sub.take(slice(0, n)).unpermute(s / np.maximum(cnt, 1)))
      elif generate:
        texts.extend(self._generate(params, self._inputs(sub, arrays))[:n])
    out: dict[str, Any] = {"texts": texts}
    if rank:
      out["scores"] = np.concatenate(sums, 0)
      out["scores_lnorm"] = np.concatenate(means, 0)
    if generate:
      out["gen_hit"] = generation_hits(texts, [self.titles[t] for t in es.targets])
    return out

  @staticmethod
  def packed_len(cont_mask: np.ndarray, min_packed_len: int = 0) -> int:
    """Tokens of the one pass that scores the answers back to back (no padding between
    them): `min_packed_len` when they fit in it, else a multiple of 64 (so that a run
    compiles few programs)."""
    need = scoring_lib.packed_length(cont_mask, multiple=1)
    return (min_packed_len if need <= min_packed_len
            else generate_lib.bucket_length(need, 64))

  def _generate(self, params, batch: dict) -> list[str]:
    embeds = self._embeds(params, self.llm_params, self.item_table, batch)
    out = generate_lib.generate(
        self.llm, lora_lib.with_adapters(self.llm_params, params),
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"], max_new_tokens=self.max_new_tokens,
        eos_id=self.eos_ids, pad_id=int(self.tokenizer.pad_token_id),
        repetition_penalty=self.repetition_penalty)
    return self._decode(self._fetch(out))

  def _decode(self, out: generate_lib.GenerateOutput) -> list[str]:
    toks = np.asarray(out.tokens)
    lens = np.asarray(out.lengths)
    return [self.tokenizer.decode(toks[b, :lens[b]], skip_special_tokens=True)
            for b in range(toks.shape[0])]

  def generate_texts(self, params, es: EvalSet, user_rep: np.ndarray | None,
                     task: str = "genre", desc: str = "generate",
                     min_prompt_len: int = 0) -> list[str]:
    """Model `params`' greedy answers to `task` prompts of `es`'s users."""
    texts = []
    for sub, rep, n in self._steps(es, user_rep, desc):
      arrays = self._batch(sub, rep, task, min_prompt_len=min_prompt_len)
      texts.extend(self._generate(params, self._inputs(sub, arrays))[:n])
    return texts


def process_rows(mesh, batch_size: int) -> tuple[int, np.ndarray | None]:
  """(users per evaluation step, the rows of each step's batch this process places).

  One process, no mesh, or a mesh whose data axes do not split the rows over the processes
  (e.g. tensor parallelism across hosts): (batch_size, None), every process runs every
  user. Else a step runs P x batch_size users (rounded up to a multiple of the mesh's data
  shards) as one global batch laid out by `sharding.batch_sharding`; the rows are those of
  this process's devices, in the order `put_batch(process_local=True)` places them."""
  pc = jax.process_count()
  if mesh is None or pc == 1:
    return batch_size, None
  shards = mesh.shape[ct.DATA] * mesh.shape[ct.FSDP]
  step = -(-batch_size * pc // shards) * shards
  index = sharding.batch_sharding(mesh).addressable_devices_indices_map((step,))
  spans = sorted({idx[0].indices(step)[:2] for idx in index.values()})
  rows = np.concatenate([np.arange(a, b) for a, b in spans])
  if len(rows) * pc != step:
    return batch_size, None
  return step, rows


def permute_slots(item_ids: np.ndarray, seed: int, users: np.ndarray) -> np.ndarray:
  """int[B, S]: each row's used item slots (id > 0) hold the same items in a seeded random
  order (keyed by user), so the soft tokens no longer belong to the titles beside them."""
  out = np.array(item_ids)
  for b in range(out.shape[0]):
    used = np.nonzero(out[b] > 0)[0]
    rng = np.random.default_rng([seed, int(users[b])])
    out[b, used] = out[b, rng.permutation(used)]
  return out


def target_loss(result: dict[str, Any]) -> float:
  """Mean over users of the target answer's mean token negative log-likelihood."""
  return float(-np.mean(result["scores_lnorm"][:, 0]))


DIAGNOSTICS = ("user_shuffled", "context_shuffled", "items_permuted")


def shuffle_cycle(n: int, seed: int) -> np.ndarray:
  """int[n]: a seeded permutation made of one cycle, so that no row keeps its own index
  (n >= 2)."""
  cycle = np.random.default_rng(seed).permutation(n)
  perm = np.empty(n, np.int64)
  perm[cycle] = np.roll(cycle, 1)
  return perm


def soft_token_diagnostics(ev: LLMEvaluator, params, es: EvalSet, user_rep: np.ndarray,
                           prefix: str, seed: int, true_metrics: dict[str, float] | None = None,
                           which: tuple[str, ...] = DIAGNOSTICS) -> dict[str, float]:
  """Does the model (`params`, scored by `ev`) use what it is told about the user? Ranking
  hit@1 / MRR and the target loss with the true inputs and with one perturbation each:

  - user_shuffled: x_u taken from another user (one seeded random cycle, so no user keeps
    its own); the history in the prompt is still the user's.
  - context_shuffled: the whole user context from that other user: x_u AND the prompt's
    history (titles and their item tokens); only the candidates stay. What is left is what
    the candidates alone tell (a popularity-like prior).
  - items_permuted: each prompt's item tokens permuted among its slots.

  `true_metrics` = {"hit@1", "mrr", "loss"} of the same evaluation, when already known
  (skips that pass); `which` selects the perturbations.
  """
  unknown = set(which) - set(DIAGNOSTICS)
  if unknown:
    raise ValueError(f"config.eval.diagnostics: unknown {sorted(unknown)}; known: "
                     f"{list(DIAGNOSTICS)}")
  perm = shuffle_cycle(len(es.users), seed)
  context = EvalSet(es.users, es.seq[perm], es.history[perm], es.candidates, es.order)
  inputs = {"user_shuffled": (es, user_rep[perm], None),
            "context_shuffled": (context, user_rep[perm], None),
            "items_permuted": (es, user_rep, seed)}
  out = {}
  runs = [(f"_{w}", *inputs[w]) for w in DIAGNOSTICS if w in which]
  if true_metrics is None:
    runs.insert(0, ("", es, user_rep, None))
  else:
    out.update({f"{prefix}{k}": float(v) for k, v in true_metrics.items()})
  for name, rows, rep, permute in runs:
    res = ev.evaluate(params, rows, rep, generate=False, desc=f"diag{name}",
                      permute_items_seed=permute)
    m = ranking_metrics(res["scores"], "")
    out[f"{prefix}hit@1{name}"] = m["hit@1"]
    out[f"{prefix}mrr{name}"] = m["mrr"]
    out[f"{prefix}loss{name}"] = target_loss(res)
  return out


def generation_hits(texts: list[str], target_titles: list[str]) -> np.ndarray:
  """float[B]: 1 where the normalised target title occurs in the normalised text."""
  return np.asarray([float(prompts_lib.normalize_title(t) in prompts_lib.normalize_title(x))
                     for x, t in zip(texts, target_titles)], np.float32)


def llm_metrics(result: dict[str, Any], prefix: str = "test/") -> dict[str, float]:
  out = {}
  if "scores" in result:
    out.update(ranking_metrics(result["scores"], prefix))
    out.update(ranking_metrics(result["scores_lnorm"], prefix, suffix="_lnorm"))
    out[f"{prefix}target_loss"] = target_loss(result)
  if "gen_hit" in result:
    out[f"{prefix}gen_hit@1"] = float(np.mean(result["gen_hit"])) if len(result["gen_hit"]) else 0.0
  return out
