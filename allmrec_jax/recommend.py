"""Recommendations for one user from a finished run: the CF model retrieves, the LLM re-ranks.

  rec = Recommender(config, workdir)            # config: configs.base.run_config(workdir)
  rec.recommend(user=42, k=20)                  # a known user: their whole sequence
  rec.recommend(history=["Star Wars (1977)", "Fargo (1996)"])   # titles of known items

The CF backbone scores every item of the catalogue for the user's sequence (the items of
the history masked) and keeps the top `k`; these become the candidates of A-LLMRec's
recommendation prompt (in the CF order) with the user's [U] token and the items' soft
tokens, and the LLM scores each candidate title by its log-likelihood as the answer (the
ranking protocol of the evaluation). With `explain`, the LLM also answers the paper's genre
question for the user.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from allmrec_jax import config_lib
from allmrec_jax import scoring as scoring_lib
from allmrec_jax import sharding
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import prepare
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.trainers import stage2_run as stage2_run_lib
from allmrec_jax.trainers import variants as variants_lib

REQUIRED = ("cf", "stage1", "stage2")
FLOOR_USERS = 4096        # known users whose top-k prompts set the compiled shapes


@dataclasses.dataclass(frozen=True)
class Recommendation:
  """One re-ranked item: `llm_score` = sum of the title's token log-probabilities as the
  answer (the ranking score), `cf_score` = the CF backbone's score, `cf_rank` (1-based)."""
  item: int
  title: str
  llm_score: float
  cf_score: float
  cf_rank: int


@dataclasses.dataclass(frozen=True)
class Answer:
  items: list[Recommendation]       # best first
  history: list[str]                # the titles the prompt shows (last config.eval.num_history)
  explanation: str | None = None    # the genre answer (explain=True)


def check_run(workdir: pathlib.Path) -> None:
  """One-line FileNotFoundError naming the first stage a run folder lacks."""
  for stage in REQUIRED:
    if loop_lib.finished(workdir / stage) is None:
      marker = workdir / stage / loop_lib.MARKER
      raise FileNotFoundError(f"{workdir}: no finished {stage} stage ({marker} is missing); "
                              "train it with launch/train.py first")


class Recommender:
  """A finished run loaded once (CF model, item tables, LLM, stage-2 projectors)."""

  def __init__(self, config, workdir):
    workdir = pathlib.Path(workdir).expanduser()
    check_run(workdir)
    self.config = config
    self.ds = prepare.prepare_dataset(config.data)
    cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, self.ds)
    self.cf_model, self.cf_vars = cf_model, {"params": cf_params}
    tables = item_tables_lib.item_tables(config, workdir, self.ds, cf_model, self.cf_vars)
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    rules = sharding.axis_rules(config.mesh.logical_axis_rules)
    # No evaluation set: the users come one call at a time.
    self.run = stage2_run_lib.Stage2Run(config, workdir, self.ds, cf_model=cf_model,
                                        cf_params=self.cf_vars, item_tables=tables,
                                        loaded=stage2_run_lib.load_llm(config, mesh, rules),
                                        es=None, mesh=mesh, rules=rules)
    variant = variants_lib.configured(config_lib.Stage2Config.from_config(config))
    table = self.run.item_table(variant)
    self.params = stage2_lib.train(config, workdir, self.ds, variant=variant,
                                   llm=self.run.loaded.module, llm_params=self.run.llm_params,
                                   builder=self.run.builder,
                                   user_rep_fn=self.run.user_representations,
                                   item_table=table, mesh=mesh, rules=rules,
                                   restore_only=True)
    self.evaluator = self.run.evaluator(variant, table, batch_size=1)
    self._floors: dict[int, tuple[int, int]] = {}
    self._title_index: dict[str, list[int]] = {}
    for i, t in enumerate(self.ds.titles):
      if i:
        self._title_index.setdefault(t.strip().lower(), []).append(i)

  def items_of_titles(self, titles: list[str]) -> np.ndarray:
    """int32 ids of item titles (exact, case-insensitive); ValueError naming an unknown one."""
    ids = []
    for t in titles:
      found = self._title_index.get(t.strip().lower())
      if found is None:
        raise ValueError(f"--history: unknown title {t!r} (titles are the dataset's, e.g. "
                         f"{self.ds.titles[1]!r})")
      if len(found) > 1:
        raise ValueError(f"--history: title {t!r} names {len(found)} items ({found}); leave "
                         "it out or use --user")
      ids.append(found[0])
    return np.asarray(ids, np.int32)

  def sequence_of_user(self, user: int) -> np.ndarray:
    if not 0 <= user < self.ds.num_users:
      raise ValueError(f"--user={user}: unknown user (this dataset has users 0.."
                       f"{self.ds.num_users - 1})")
    return np.asarray(self.ds.sequence(user), np.int32)

  def _top_k(self, histories: list[np.ndarray], k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CF retrieval for item histories: (int32[B, k] the top-k items, float64[B, N] the
    scores of the catalogue with each history's items masked, int32[B, maxlen] the
    left-padded CF input)."""
    lens = np.asarray([len(h) for h in histories], np.int64)
    ends = np.cumsum(lens)
    flat = np.concatenate(histories).astype(np.int64)
    seqs = dataset_lib.left_pad(ends - lens, ends, flat, int(self.config.data.maxlen))
    catalogue = np.arange(1, self.ds.num_items + 1, dtype=np.int32)[None]
    cf = np.asarray(eval_lib.cf_score(self.cf_model, self.cf_vars, seqs,
                                      np.repeat(catalogue, len(seqs), 0))).astype(np.float64)
    cf[np.repeat(np.arange(len(histories)), lens), flat - 1] = -np.inf
    top = np.argsort(-cf, axis=1, kind="stable")[:, :k]
    return (top + 1).astype(np.int32), cf, seqs

  def shape_floors(self, k: int) -> tuple[int, int]:
    """(prompt length, packed answer length) of the longest top-`k` prompt of the known
    users (up to FLOOR_USERS of them, seeded): every call with this `k` whose prompt fits
    is padded to them and runs the program compiled by the first; a longer one (a long
    --history) runs a longer bucket, compiled once."""
    if k not in self._floors:
      h = int(self.config.eval.num_history)
      users = np.arange(self.ds.num_users)
      if len(users) > FLOOR_USERS:
        users = np.sort(np.random.default_rng(0).choice(users, FLOOR_USERS, replace=False))
      soft, builder = self.evaluator.soft, self.run.builder
      prompt, need = 0, 0
      for i in range(0, len(users), 256):
        cands, _, seqs = self._top_k([self.sequence_of_user(int(u))
                                      for u in users[i:i + 256]], k)
        pb = builder.build(seqs[:, -h:], cands, None, soft=soft, padding="left")
        prompt = max(prompt, int(pb.arrays()["input_ids"].shape[1]))
        _, mask = builder.continuations(cands, soft=soft)
        need = max(need, scoring_lib.packed_length(mask, multiple=1))
      self._floors[k] = (prompt, need)
    return self._floors[k]

  def recommend(self, user: int | None = None, history: list[str] | None = None, k: int = 20,
                explain: bool = False) -> Answer:
    """The top-`k` CF items re-ranked by the LLM, for a known user or a list of titles."""
    if (user is None) == (history is None):
      raise ValueError("pass exactly one of user and history")
    items = self.sequence_of_user(user) if user is not None else self.items_of_titles(history)
    if len(items) == 0:
      raise ValueError("the history is empty")
    n_items = self.ds.num_items
    if not 1 <= k <= n_items - len(set(items.tolist())):
      raise ValueError(f"--top_k={k}: must be in 1..{n_items - len(set(items.tolist()))}")
    floors = self.shape_floors(k)
    cands, cf, seq = self._top_k([items], k)          # the history is masked
    cf, top = cf[0], cands[0] - 1
    h = int(self.config.eval.num_history)
    hist = seq[:, -h:]
    es = eval_lib.EvalSet(users=np.asarray([user if user is not None else -1], np.int32),
                          seq=seq, history=hist, candidates=cands,
                          order=np.arange(k, dtype=np.int32)[None])
    rep = self.run.user_representations(seq)
    res = self.evaluator.evaluate(self.params, es, rep, generate=False, desc="recommend",
                                  min_prompt_len=floors[0], min_packed_len=floors[1])
    llm = res["scores"][0]
    order = np.argsort(-llm, kind="stable")
    recs = [Recommendation(item=int(cands[0, j]), title=self.ds.titles[int(cands[0, j])],
                           llm_score=float(llm[j]), cf_score=float(cf[top[j]]),
                           cf_rank=int(j) + 1) for j in order]
    explanation = None
    if explain:
      explanation = self.evaluator.generate_texts(self.params, es, rep, task="genre",
                                                  desc="explain", min_prompt_len=floors[0])[0]
    return Answer(items=recs, history=[self.ds.titles[int(i)] for i in hist[0] if i > 0],
                  explanation=explanation)
