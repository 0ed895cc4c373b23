"""What the stage-2 trainings and evaluations of one run share (`Stage2Run`): the frozen
LLM, the prompt builder, the item tables, the scored users with their x_u, and
`eval/<key>.json`, which keeps each finished evaluation so that an interrupted one resumes
with the next model. Each model is a `variants.Variant`."""

from __future__ import annotations

from collections.abc import Callable
import json
import pathlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import config_lib
from allmrec_jax import metrics as metrics_lib
from allmrec_jax.data import prompts as prompts_lib
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.trainers import variants as variants_lib
from allmrec_jax.weights import llm as llm_weights

BOS_CHOICES = {"first": "bos_user", "after_user": "user_bos", "none": "user"}


def prompt_builder(ds, tokenizer, cfg) -> prompts_lib.PromptBuilder:
  """The dataset's PromptBuilder for this tokenizer and `config.stage2`.

  `cfg.bos`: "first" = a fixed first token, then [U] (no soft token at position 0, the
  attention sink); "after_user" = [U], then the BOS (the authors' order: `[U]</s> is a
  user representation...`); "none" = [U] at position 0. The first token is the
  tokenizer's BOS, or `cfg.first_token` (a token of its vocabulary) when it has none or
  when that field is set. `cfg.item_slot` / `cfg.user_at_answer`: see `data/prompts.py`.
  """
  if cfg.bos not in BOS_CHOICES:
    raise ValueError(f"config.stage2.bos={cfg.bos!r}; expected one of {sorted(BOS_CHOICES)}")
  first = cfg.first_token or ""
  if first:
    first_id = tokenizer.convert_tokens_to_ids(first)
    if first_id is None or first_id == tokenizer.unk_token_id:
      raise ValueError(f"config.stage2.first_token={first!r} is not a token of the "
                       "tokenizer's vocabulary")
  else:
    first_id = tokenizer.bos_token_id
  if cfg.bos != "none" and first_id is None:
    raise ValueError(f"config.stage2.bos={cfg.bos!r} but the tokenizer has no BOS; name "
                     "a first token with config.stage2.first_token")
  builder = prompts_lib.PromptBuilder(
      tokenizer, ds.titles, ds.domain, max_title_tokens=cfg.max_title_tokens,
      bos_id=first_id, lead=BOS_CHOICES[cfg.bos],
      item_slot=cfg.item_slot, user_at_answer=cfg.user_at_answer,
      eos_id=tokenizer.eos_token_id,
      slot_id=tokenizer.pad_token_id, pad_id=tokenizer.pad_token_id,
      len_bucket=cfg.len_bucket)
  if builder.num_truncated_titles:
    logging.info("prompts: %d titles cut to %d tokens (config.stage2.max_title_tokens)",
                 builder.num_truncated_titles, cfg.max_title_tokens)
  return builder


def load_llm(config, mesh=None, rules=None):
  """The configured LLM (`weights.llm.LoadedLLM`), sharded over `mesh`."""
  return llm_weights.load_llm(
      config.llm.path or None, dtype=config.llm.dtype, mesh=mesh, rules=rules,
      remat=config.llm.remat, matmul_dtype=config.llm.matmul_dtype or "",
      lora_rank=config.llm.lora_rank, lora_alpha=config.llm.lora_alpha,
      lora_targets=lora_lib.parse_targets(config.llm.lora_targets))


class Stage2Run:
  """The stage-2 models of one run folder, trained and scored on one set of users.

  Args:
    config, workdir, ds: the run.
    cf_model, cf_params: the frozen CF model ({"params": ...}).
    item_tables: {source: float[N+1, K]} the tables F_I can be fed (`item_tables.py`).
    loaded: the LLM (`load_llm`).
    es: the users every model is scored on (None: a run that only serves recommendations,
      `recommend.py`).
    user_rep: float[B, D] their x_u (None: the CF model's, `user_representations(es.seq)`).
    eval_dir: where each evaluation is kept (None: workdir/stage2/eval).
  """

  def __init__(self, config, workdir: pathlib.Path, ds, *, cf_model, cf_params,
               item_tables: dict[str, np.ndarray], loaded, es: eval_lib.EvalSet | None,
               user_rep: np.ndarray | None = None, eval_dir: pathlib.Path | None = None,
               mesh=None, rules=None):
    self.config, self.workdir, self.ds = config, workdir, ds
    self.cfg, self.ecfg = config_lib.Stage2Config.from_config(config), config.eval
    self.cf_model, self.cf_params, self.item_tables = cf_model, cf_params, item_tables
    self.mesh, self.rules = mesh, rules
    self.loaded = loaded
    self.llm_params = {"params": self.loaded.params}
    self.builder = prompt_builder(ds, self.loaded.tokenizer, self.cfg)
    self.es = es
    if user_rep is None and es is not None:
      user_rep = self.user_representations(es.seq)
    self.user_rep = user_rep
    self.prefix = f"{self.ecfg.split}/"
    self.eval_dir = workdir / "stage2" / "eval" if eval_dir is None else eval_dir
    self.examples: dict[str, dict] = {}      # label -> {"texts"} for results.md

  def user_representations(self, seq: np.ndarray) -> np.ndarray:
    return stage2_lib.user_representations(self.cf_model, self.cf_params, seq)

  def projectors_for(self, table: np.ndarray) -> projectors_lib.Stage2Projectors:
    seq = jax.ShapeDtypeStruct((1, self.config.data.maxlen), jnp.int32)
    user_dim = jax.eval_shape(lambda s: self.cf_model.apply(
        self.cf_params, s, method=self.cf_model.user_representation), seq).shape[1]
    return projectors_lib.Stage2Projectors(table.shape[1], user_dim,
                                           self.loaded.config.embed_dim)   # input width

  def item_table(self, variant: variants_lib.Variant) -> np.ndarray:
    """The table `variant` feeds to F_I (standardised with config.stage2.item_standardize)."""
    return item_tables_lib.item_table_for(variant.item_source(self.cfg.item_source),
                                          self.item_tables, self.config.seed,
                                          standardize=self.cfg.item_standardize)

  def evaluator(self, variant: variants_lib.Variant, table: np.ndarray | None = None, *,
                batch_size: int | None = None) -> eval_lib.LLMEvaluator:
    """An LLMEvaluator of `variant` with this run's LLM and prompts (`table`: what F_I is
    fed; unused by a text-only variant)."""
    kw = dict(llm=self.loaded.module, llm_params=self.llm_params,
              tokenizer=self.loaded.tokenizer, builder=self.builder, titles=self.ds.titles,
              batch_size=self.ecfg.batch_size if batch_size is None else batch_size,
              max_new_tokens=self.ecfg.max_new_tokens,
              repetition_penalty=self.ecfg.repetition_penalty, mesh=self.mesh)
    if variant.text_only:
      return eval_lib.LLMEvaluator(soft=False, **kw)
    return eval_lib.LLMEvaluator(projectors=self.projectors_for(table), item_table=table,
                                 use_user=variant.use_user, use_items=variant.use_items,
                                 **kw)

  def validation_fn(self, variant: variants_lib.Variant, table: np.ndarray
                    ) -> Callable[[dict], dict[str, float]] | None:
    """params -> validation ranking metrics on `stage2.eval_users` seeded users (None when
    `stage2.eval_every` is 0)."""
    if not self.cfg.eval_every:
      return None
    val = eval_lib.make_eval_set(self.ds, "valid", maxlen=self.config.data.maxlen,
                                 num_history=self.ecfg.num_history,
                                 max_users=self.cfg.eval_users,
                                 seed=self.config.data.candidate_seed)
    val_rep = self.user_representations(val.seq)
    ev = self.evaluator(variant, table)

    def run(params):
      res = ev.evaluate(params, val, val_rep, generate=False, desc="validate")
      m = eval_lib.ranking_metrics(res["scores"], "val/")
      return {"val/hit@1": m["val/hit@1"], "val/hit@5": m["val/hit@5"],
              "val/mrr": m["val/mrr"], "val/loss": eval_lib.target_loss(res)}
    return run

  def train_variant(self, variant: variants_lib.Variant, users: np.ndarray | None = None):
    """Trains (or restores) `variant` in its folder (`users`: only these users' examples,
    the few-shot scenario); returns (params, table). A variant that trains nothing
    (LLM-Only): (None, None)."""
    if not variant.trained:
      return None, None
    table = self.item_table(variant)
    params = stage2_lib.train(self.config, self.workdir, self.ds, variant=variant,
                              llm=self.loaded.module, llm_params=self.llm_params,
                              builder=self.builder, user_rep_fn=self.user_representations,
                              item_table=table, mesh=self.mesh, rules=self.rules,
                              users=users, eval_fn=self.validation_fn(variant, table))
    return params, table

  def evaluated(self, key: str, label: str, run, prepare=lambda: None) -> dict[str, float]:
    """Runs one model's evaluation once; its metrics and texts are kept in eval/<key>.json.
    `prepare()` (e.g. training the baseline) runs first, outside `eval/<key>/seconds`;
    `run(prepared)` returns (evaluation result, metrics). Besides the metrics, the file keeps
    each user's rank of the target (0 = first; ranking protocol) and generation hit, so that
    subsets (cold / warm targets) can be scored later without another pass."""
    path = self.eval_dir / f"{key}.json"
    if path.exists():
      saved = json.loads(path.read_text())
    else:
      prepared = prepare()
      t0 = time.perf_counter()
      res, m = run(prepared)
      m = {**m, f"eval/{key}/seconds": time.perf_counter() - t0}
      saved = {"metrics": m, "texts": res.get("texts", []), "users": self.es.users.tolist()}
      if "scores" in res:
        saved["rank"] = metrics_lib.rank_of_target(res["scores"]).tolist()
      if "gen_hit" in res:
        saved["gen_hit"] = np.asarray(res["gen_hit"]).tolist()
      self.eval_dir.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(saved))
    if saved["texts"]:
      self.examples[label] = {"texts": saved["texts"]}
    return saved["metrics"]


def make_stage2_run(config, workdir: pathlib.Path, ds, *, cf_model, cf_params,
                    item_tables: dict[str, np.ndarray], mesh=None, rules=None,
                    loaded=None) -> Stage2Run:
  """The Stage2Run of a run folder's own evaluation: the `config.eval` users (a seeded
  subset of the `eval.split` users), kept in workdir/stage2/eval."""
  ecfg = config.eval
  es = eval_lib.make_eval_set(ds, ecfg.split, maxlen=config.data.maxlen,
                              num_history=ecfg.num_history, max_users=ecfg.max_users,
                              seed=config.data.candidate_seed)
  return Stage2Run(config, workdir, ds, cf_model=cf_model, cf_params=cf_params,
                   item_tables=item_tables,
                   loaded=load_llm(config, mesh, rules) if loaded is None else loaded,
                   es=es, mesh=mesh, rules=rules)
