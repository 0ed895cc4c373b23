"""The whole method in order: data -> CF (stage 0) -> stage 1 -> stage 2 -> evaluation.

`train_and_evaluate(config, workdir)` runs the stages named in `config.stages`; a stage
whose outputs exist is restored, not rerun, and an interrupted stage resumes from its
latest checkpoint. Outputs under `workdir`: `cf/`, `stage1/`, `stage2/` (+ `stage2_mlp_llm/`),
`stage2/metrics.json` (A-LLMRec under `test/...`, each baseline under
`baselines/<name>/test/...`), `results.md` and `config.json`.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import pathlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import config_lib
from allmrec_jax import metrics as metrics_lib
from allmrec_jax import sharding
from allmrec_jax.data import prompts as prompts_lib
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import stage2 as stage2_lib


def _stages(config) -> list[str]:
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  known = ("cf", "stage1", "stage2")
  bad = [s for s in stages if s not in known]
  if bad:
    raise ValueError(f"--config.stages: unknown stage(s) {bad}; known: {list(known)}")
  return stages


_POSITIVE = ("cf.lr", "cf.batch_size", "cf.num_epochs", "stage1.lr", "stage1.batch_size",
             "stage1.num_epochs", "stage2.lr", "stage2.batch_size", "stage2.num_epochs",
             "stage2.num_candidates", "stage2.num_history", "stage2.positions_per_user",
             "eval.batch_size", "eval.num_history", "eval.max_users", "data.maxlen")
_NON_NEGATIVE = ("stage1.max_steps", "stage2.max_steps", "stage2.eval_every",
                 "stage2.user_match_weight", "stage2.user_match_batch")
_PATHS = ("data.path", "sbert.path", "llm.path")


def validate_config(config) -> None:
  """Refuses, before any stage trains, values that cannot be right: a non-positive learning
  rate, batch size, epoch count or prompt size, a negative step count, a local path that
  does not exist. One line per problem, naming the --config field."""
  problems = []

  def get(field):
    section, name = field.split(".")
    return config[section].get(name) if section in config else None

  for f in _POSITIVE:
    v = get(f)
    if v is not None and not v > 0:
      problems.append(f"--config.{f}={v!r} must be > 0")
  for f in _NON_NEGATIVE:
    v = get(f)
    if v is not None and v < 0:
      problems.append(f"--config.{f}={v!r} must be >= 0")
  for f in _PATHS:
    v = get(f)
    if v and not pathlib.Path(str(v)).expanduser().exists():
      problems.append(f"--config.{f}={v!r} does not exist")
  _stages(config)
  from allmrec_jax.trainers import stage1 as stage1_lib  # pylint: disable=import-outside-toplevel
  for build in (config_lib.CFTrainConfig.from_config, stage1_lib.Stage1Config.from_config,
                config_lib.Stage2Config.from_config):
    try:
      build(config)
    except ValueError as e:    # missing / unknown fields, impossible stage-1 values
      problems.append(str(e))
  s2 = config.stage2
  if (s2.user_match_weight and s2.user_match_batch
      and s2.user_match_negatives != "catalog"):
    problems.append("--config.stage2.user_match_batch > 0 needs "
                    "--config.stage2.user_match_negatives=catalog (the extra examples have no "
                    "prompt candidates)")
  try:
    lora_lib.parse_targets(config.llm.lora_targets)
  except ValueError as e:
    problems.append(str(e))
  has_lora = config.llm.lora_rank > 0 and bool(config.llm.lora_targets)
  if s2.train_lora and not has_lora:
    problems.append("--config.stage2.train_lora=True needs --config.llm.lora_rank > 0 and "
                    "--config.llm.lora_targets")
  if "tallrec" in str(config.eval.baselines).split(",") and not has_lora:
    problems.append("--config.eval.baselines=tallrec needs --config.llm.lora_rank > 0 and "
                    "--config.llm.lora_targets")
  try:
    baselines_of(config)
  except ValueError as e:
    problems.append(str(e))
  if problems:
    raise ValueError("invalid config: " + "; ".join(problems))


# What a finished stage's result depends on (dotted prefixes of config fields); each stage
# also depends on those of the stages before it.
_STAGE_INPUTS = {
    "cf": ("seed", "data.", "cf."),
    "stage1": ("sbert.", "stage1."),
    "stage2": ("llm.", "stage2."),
    "eval": ("eval.",),
}
# Fields that never change a result: what runs, where assets live, the mesh, logging.
_NEUTRAL = ("stages", "asset_cache_dir", "data.asset_cache_dir", "mesh.", "cf.progress",
            "cf.ckpt_every", "stage1.checkpoint_every", "stage1.log_every", "stage2.log_every",
            "stage2.ckpt_every", "stage2.eval_every", "stage2.eval_users")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def finished_stages(workdir: pathlib.Path) -> list[str]:
  """The stages whose training finished in `workdir` (their FINISHED marker), and "eval"
  once stage 2's evaluation wrote stage2/metrics.json."""
  done = [s for s in ("cf", "stage1", "stage2") if loop_lib.finished(workdir / s) is not None]
  if (workdir / "stage2" / "metrics.json").exists():
    done.append("eval")
  return done


def config_changes(config, workdir: pathlib.Path) -> dict[str, tuple]:
  """{field: (in workdir/config.json, in `config`)} of the fields that differ; raises
  ValueError (one line) when one of them produced a stage that is already finished there.
  A field on one side only (added or removed by a newer version of the code, which then
  does not read the old one) is a recorded change, never a refusal."""
  path = workdir / "config.json"
  if not path.exists():
    return {}
  try:
    old = _flat(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: unreadable ({e}); move it away to start a new run") from None
  new = _flat(json.loads(config.to_json_best_effort()))
  changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k) and not k.startswith(_NEUTRAL)}
  finished = finished_stages(workdir)
  inputs: tuple[str, ...] = ()
  blocked = []
  for stage in _STAGE_INPUTS:
    inputs += _STAGE_INPUTS[stage]
    if stage in finished:
      blocked = [k for k in changed if (k == "seed" or k.startswith(inputs))
                 and k in old and k in new]
  if blocked:
    what = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in blocked[:6])
    more = f" (+{len(blocked) - 6} more)" if len(blocked) > 6 else ""
    raise ValueError(f"{workdir}: finished stage(s) {', '.join(finished)} were produced "
                     f"with another config ({what}{more}); use a new --workdir, or delete "
                     f"the stage folders to redo them")
  return changed


def save_config(config, workdir: pathlib.Path):
  """Writes workdir/config.json (the config of the latest run) after `config_changes`
  accepted it; a changed field of an unfinished stage (a longer budget, say) is appended
  to workdir/config_history.jsonl, so config.json never hides what produced the results."""
  workdir.mkdir(parents=True, exist_ok=True)
  changed = config_changes(config, workdir)
  if changed:
    with open(workdir / "config_history.jsonl", "a") as f:
      f.write(json.dumps({"changed": {k: list(v) for k, v in changed.items()}},
                         default=str) + "\n")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


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


def standardize_items(table: np.ndarray) -> np.ndarray:
  """Each column of the item rows 1..N to mean 0 and standard deviation 1 (row 0, the
  padding item, stays zero). An affine map of F_I's input, which F_I's first Linear can
  represent: the function class is the paper's, only the optimisation's conditioning
  changes. Sigmoid joint codes can sit in a narrow band (ML-100K: per-dimension std 0.033
  around 0.5, mean item-item cosine 0.996), which F_I maps to near-identical soft tokens."""
  table = np.asarray(table, np.float64)
  rows = table[1:]
  mean, std = rows.mean(0), rows.std(0)
  const = std <= 1e-9 * np.maximum(1.0, np.abs(mean))     # a constant column maps to 0
  out = np.zeros_like(table)
  out[1:] = np.where(const, 0.0, (rows - mean) / np.where(const, 1.0, std))
  return out.astype(np.float32)


def item_table_for(source: str, tables: dict[str, np.ndarray], seed: int,
                   standardize: bool = False) -> np.ndarray:
  """The item table fed to F_I: joint (paper), text (A-LLMRec SBERT), cf (MLP-LLM), random;
  with `standardize` (config.stage2.item_standardize) per column over the items."""
  if source == "random":
    like = tables["joint"]
    rng = np.random.default_rng(seed)
    table = rng.uniform(size=like.shape).astype(np.float32)   # same range as sigmoid codes
  elif source not in tables:
    raise ValueError(f"config.stage2.item_source={source!r}; known: "
                     f"{sorted(tables) + ['random']}")
  else:
    table = np.asarray(tables[source], np.float32)
  return standardize_items(table) if standardize else table


def load_llm(config, mesh=None, rules=None):
  """The configured LLM (`weights.llm.LoadedLLM`), sharded over `mesh`."""
  from allmrec_jax.weights import llm as llm_weights  # pylint: disable=import-outside-toplevel
  return llm_weights.load_llm(
      config.llm.path or None, dtype=config.llm.dtype, mesh=mesh, rules=rules,
      remat=config.llm.remat, matmul_dtype=config.llm.matmul_dtype or "",
      lora_rank=config.llm.lora_rank, lora_alpha=config.llm.lora_alpha,
      lora_targets=lora_lib.parse_targets(config.llm.lora_targets))


class Stage2Run:
  """What the stage-2 trainings and evaluations of one run share: the frozen LLM, the prompt
  builder, the test users with their x_u, and `eval/<key>.json`, which keeps each finished
  evaluation so that an interrupted one resumes with the next model."""

  def __init__(self, config, workdir: pathlib.Path, ds, *, cf_model, cf_params,
               tables: dict[str, np.ndarray], mesh=None, rules=None,
               eval_users: bool = True, loaded=None):
    self.config, self.workdir, self.ds = config, workdir, ds
    self.cfg, self.ecfg = config_lib.Stage2Config.from_config(config), config.eval
    self.cf_model, self.cf_params, self.tables = cf_model, cf_params, tables
    self.mesh, self.rules = mesh, rules
    self.loaded = loaded if loaded is not None else load_llm(config, mesh, rules)
    self.llm_params = {"params": self.loaded.params}
    self.builder = prompt_builder(ds, self.loaded.tokenizer, self.cfg)
    self.es = self.user_rep = None        # eval_users=False: no evaluation set (recommend)
    if eval_users:
      self.es = eval_lib.make_eval_set(ds, self.ecfg.split, maxlen=config.data.maxlen,
                                       num_history=self.ecfg.num_history,
                                       max_users=self.ecfg.max_users,
                                       seed=config.data.candidate_seed)
      self.user_rep = self.user_representations(self.es.seq)
    self.prefix = f"{self.ecfg.split}/"
    self.eval_dir = workdir / "stage2" / "eval"
    self.examples: dict[str, dict] = {}      # label -> {"texts"} for results.md
    self.genre_answers: dict | None = None    # eval/genre.json (eval.genre_users > 0)

  def user_representations(self, seq: np.ndarray) -> np.ndarray:
    return stage2_lib.user_representations(self.cf_model, self.cf_params, seq)

  def projectors_for(self, table: np.ndarray) -> projectors_lib.Stage2Projectors:
    seq = jax.ShapeDtypeStruct((1, self.config.data.maxlen), jnp.int32)
    user_dim = jax.eval_shape(lambda s: self.cf_model.apply(
        self.cf_params, s, method=self.cf_model.user_representation), seq).shape[1]
    return projectors_lib.Stage2Projectors(table.shape[1], user_dim,
                                           self.loaded.config.hidden_size)

  def evaluator(self, table=None, proj_params=None, *, use_user=True, use_items=True,
                soft=True) -> eval_lib.LLMEvaluator:
    """An LLMEvaluator of this run's LLM and prompts (soft=False: text-only prompts)."""
    kw = dict(llm=self.loaded.module, llm_params=self.llm_params,
              tokenizer=self.loaded.tokenizer, builder=self.builder, titles=self.ds.titles,
              batch_size=self.ecfg.batch_size, max_new_tokens=self.ecfg.max_new_tokens,
              repetition_penalty=self.ecfg.repetition_penalty)
    if not soft:   # text-only prompts; proj_params = {"lora": ...} of a TALLRec run
      return eval_lib.LLMEvaluator(soft=False, proj_params=proj_params, **kw)
    return eval_lib.LLMEvaluator(projectors=self.projectors_for(table), proj_params=proj_params,
                                 item_table=table, use_user=use_user, use_items=use_items,
                                 **kw)

  def validation_fn(self, table, use_user, use_items, soft=True):
    """params -> validation ranking metrics on `stage2.eval_users` seeded users (None when
    `stage2.eval_every` is 0)."""
    if not self.cfg.eval_every:
      return None
    val = eval_lib.make_eval_set(self.ds, "valid", maxlen=self.config.data.maxlen,
                                 num_history=self.ecfg.num_history,
                                 max_users=self.cfg.eval_users,
                                 seed=self.config.data.candidate_seed)
    val_rep = self.user_representations(val.seq)
    ev = self.evaluator(table, use_user=use_user, use_items=use_items, soft=soft)

    def run(params):
      ev.proj_params = params
      res = ev.evaluate(val, val_rep, generate=False, desc="validate")
      m = eval_lib.ranking_metrics(res["scores"], "val/")
      return {"val/hit@1": m["val/hit@1"], "val/hit@5": m["val/hit@5"],
              "val/mrr": m["val/mrr"], "val/loss": eval_lib.target_loss(res)}
    return run

  def train_variant(self, name: str, source: str, use_user: bool = True,
                    use_items: bool = True, soft: bool = True,
                    users: np.ndarray | None = None):
    """Trains (or restores) projectors in stage2-like folder `name` on item table `source`
    (soft=False: LoRA adapters on text-only prompts; `users`: only these users' examples,
    the few-shot scenario); returns (params, table)."""
    table = item_table_for(source, self.tables, self.config.seed,
                           standardize=self.cfg.item_standardize)
    params = stage2_lib.train(self.config, self.workdir, self.ds, llm=self.loaded.module,
                              llm_params=self.llm_params, builder=self.builder,
                              user_rep_fn=self.user_representations, item_table=table,
                              name=name, mesh=self.mesh, rules=self.rules,
                              use_user=use_user, use_items=use_items, soft=soft,
                              users=users, eval_fn=self.validation_fn(table, use_user, use_items, soft))
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


# ---------------------------------------------------------------------------- baselines
# name -> (label in results.md, fn(run, prefix) -> metrics under `prefix`), scored on the
# A-LLMRec evaluation's users and candidates (config.eval.baselines).
BASELINES: dict[str, tuple[str, Callable[[Stage2Run, str], dict[str, float]]]] = {}


def register_baseline(name: str, label: str):
  def wrap(fn):
    BASELINES[name] = (label, fn)
    return fn
  return wrap


@register_baseline("cf", "CF backbone")
def _cf_baseline(run: Stage2Run, prefix: str) -> dict[str, float]:
  return eval_lib.ranking_metrics(eval_lib.cf_scores(run.cf_model, run.cf_params, run.es),
                                  prefix)


@register_baseline("popularity", "popularity count")
def _popularity_baseline(run: Stage2Run, prefix: str) -> dict[str, float]:
  return eval_lib.ranking_metrics(eval_lib.popularity_scores(run.ds, run.es), prefix)


@register_baseline("llm_only", "LLM-Only")
def _llm_only_baseline(run: Stage2Run, prefix: str) -> dict[str, float]:
  def evaluate(_):
    r = run.evaluator(soft=False).evaluate(run.es, None, desc="eval LLM-Only")
    return r, eval_lib.llm_metrics(r, prefix)
  return run.evaluated("llm_only", "LLM-Only", evaluate)


def evaluate_variant(run: Stage2Run, prefix: str = "", *, key: str, label: str, folder: str,
                     source: str | None = None, use_user: bool = True,
                     use_items: bool = True, soft: bool = True,
                     users: np.ndarray | None = None) -> dict[str, float]:
  """Stage 2 trained (or restored) in `folder` with item table `source` (None: the
  configured one), an input left out, text-only prompts (soft=False: LoRA adapters only,
  TALLRec) or `users` only; evaluated on the run's users like A-LLMRec and kept as
  eval/<key>.json."""
  def evaluate(trained):
    params, table = trained
    ev = (run.evaluator(table, params, use_user=use_user, use_items=use_items) if soft
          else run.evaluator(proj_params=params, soft=False))
    r = ev.evaluate(run.es, run.user_rep if soft else None, desc=f"eval {label}")
    return r, eval_lib.llm_metrics(r, prefix)
  return run.evaluated(key, label, evaluate, prepare=lambda: run.train_variant(
      folder, source or run.cfg.item_source, use_user, use_items, soft=soft, users=users))


def evaluate_allmrec(run: Stage2Run, prefix: str) -> tuple[dict[str, float],
                                                          eval_lib.LLMEvaluator]:
  """A-LLMRec (the configured stage 2, trained or restored in stage2/) on the run's users:
  (metrics under `prefix`, its evaluator)."""
  cfg = run.cfg
  params, table = run.train_variant("stage2", cfg.item_source, cfg.use_user, cfg.use_items)
  ev = run.evaluator(table, params, use_user=cfg.use_user, use_items=cfg.use_items)

  def evaluate(_):
    res = ev.evaluate(run.es, run.user_rep, desc="eval A-LLMRec")
    return res, eval_lib.llm_metrics(res, prefix)
  return run.evaluated("allmrec", "A-LLMRec", evaluate), ev


def _variant_baseline(key: str, label: str, folder: str, source: str | None = None, *,
                      use_user: bool = True, use_items: bool = True, soft: bool = True,
                      doc: str = ""):
  """Registers a stage-2 variant (`evaluate_variant`) as baseline `key`."""
  def fn(run: Stage2Run, prefix: str) -> dict[str, float]:
    return evaluate_variant(run, prefix, key=key, label=label, folder=folder, source=source,
                            use_user=use_user, use_items=use_items, soft=soft)
  fn.__doc__ = doc
  register_baseline(key, label)(fn)


_variant_baseline("mlp_llm", "MLP-LLM", "stage2_mlp_llm", "cf",
                  doc="Stage 2 trained again with F_I fed the CF item embeddings (no stage 1).")
_variant_baseline("tallrec", "TALLRec", "stage2_tallrec", soft=False,
                  doc="LoRA adapters (config.llm.lora_*) trained on the text-only prompts of "
                      "LLM-Only with stage 2's budget and optimizer (TALLRec: Bao et al. "
                      "2023, rank 8 on q and v).")
_variant_baseline("sbert", "A-LLMRec (SBERT)", "stage2_sbert", "text",
                  doc="Stage 2 on the text-path joint embeddings f_T^enc(SBERT(text)).")
_variant_baseline("no_user", "A-LLMRec w/o user representation", "stage2_no_user",
                  use_user=False, doc="Stage-2 ablation: no user token.")
_variant_baseline("no_items", "A-LLMRec w/o joint embedding", "stage2_no_items",
                  use_items=False, doc="Stage-2 ablation: no item soft tokens.")
_variant_baseline("random_items", "A-LLMRec with random joint embedding",
                  "stage2_random_items", "random",
                  doc="Stage-2 ablation: a fixed random table instead of the joint one.")


def genre_task(run: Stage2Run, ev: eval_lib.LLMEvaluator) -> dict[str, float]:
  """The paper's genre question for the first `eval.genre_users` evaluation users, answered
  by A-LLMRec (`ev`) and LLM-Only, and the history's top-3 genres as the non-LLM reference;
  genre precision / recall against the held-out items' genres (allmrec_jax/genre.py).
  Kept in eval/genre.json (metrics and answers)."""
  from allmrec_jax import genre as genre_lib  # pylint: disable=import-outside-toplevel
  path = run.eval_dir / "genre.json"
  if path.exists():
    saved = json.loads(path.read_text())
  else:
    n = min(int(run.ecfg.genre_users), len(run.es.users))
    sub, rep = run.es.take(slice(0, n)), run.user_rep[:n]
    answers = {
        "A-LLMRec": ev.generate_texts(sub, rep, task="genre", desc="genre A-LLMRec"),
        "LLM-Only": run.evaluator(soft=False).generate_texts(sub, None, task="genre",
                                                             desc="genre LLM-Only"),
        "history top-3 genres": genre_lib.history_genres_answer(run.ds, sub.history)}
    vocab = genre_lib.genre_vocabulary(run.ds.genres)
    ref = genre_lib.held_out_genres(run.ds, sub.users)
    keys = {"A-LLMRec": "allmrec", "LLM-Only": "llm_only", "history top-3 genres": "history"}
    metrics = {"genre/num_users": float(n)}
    for label, texts in answers.items():
      metrics.update(genre_lib.genre_metrics(texts, ref, vocab, f"genre/{keys[label]}/"))
    saved = {"metrics": metrics, "answers": answers, "users": sub.users.tolist(),
             "held_out": [sorted(r) for r in ref]}
    run.eval_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved))
  run.genre_answers = saved
  return saved["metrics"]


def baselines_of(config) -> list[str]:
  """config.eval.baselines as a list; an unknown name is a one-line error."""
  names = [b.strip() for b in str(config.eval.baselines).split(",") if b.strip()]
  bad = [b for b in names if b not in BASELINES]
  if bad:
    raise ValueError(f"--config.eval.baselines: unknown baseline(s) {bad}; known: "
                     f"{sorted(BASELINES)}")
  return names


def run_stage2(config, workdir: pathlib.Path, ds, *, cf_model, cf_params,
               tables: dict[str, np.ndarray], mesh=None, rules=None) -> dict:
  """Trains A-LLMRec's projectors, evaluates them (ranking, generation, soft-token
  diagnostics) and the baselines, writes `stage2/metrics.json` and `results.md`; returns the
  metrics."""
  out_path = workdir / "stage2" / "metrics.json"
  if out_path.exists():
    logging.info("stage2: %s exists; skipping (delete it to re-evaluate)", out_path)
    return json.loads(out_path.read_text())
  baselines = baselines_of(config)
  run = Stage2Run(config, workdir, ds, cf_model=cf_model, cf_params=cf_params, tables=tables,
                  mesh=mesh, rules=rules)
  prefix = run.prefix
  metrics: dict[str, float] = {"eval/num_users": float(len(run.es.users))}

  allmrec, ev = evaluate_allmrec(run, prefix)
  metrics.update(allmrec)
  metrics["eval/users_per_s"] = len(run.es.users) / metrics["eval/allmrec/seconds"]

  diagnostics = tuple(d.strip() for d in str(run.ecfg.diagnostics).split(",")
                      if d.strip())

  def evaluate_diagnostics(_):
    known = None
    if f"{prefix}target_loss" in metrics:   # the A-LLMRec evaluation above: no third pass
      known = {k: metrics[f"{prefix}{m}"] for k, m in (("hit@1", "hit@1"), ("mrr", "mrr"),
                                                        ("loss", "target_loss"))}
    return {}, eval_lib.soft_token_diagnostics(ev, run.es, run.user_rep, f"diag/{prefix}",
                                               seed=config.seed, true_metrics=known,
                                               which=diagnostics)
  if diagnostics:
    metrics.update(run.evaluated("diagnostics", "diagnostics", evaluate_diagnostics))

  for name in baselines:
    metrics.update(BASELINES[name][1](run, f"baselines/{name}/{prefix}"))
  if int(run.ecfg.genre_users) > 0:
    metrics.update(genre_task(run, ev))
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
  write_results(workdir / "results.md", metrics, baselines, prefix, run.es, run.builder, ds,
                run.examples, run.ecfg.num_examples, genre=run.genre_answers,
                config=config)
  return metrics


def results_table(metrics: dict, baselines: list[str], prefix: str) -> str:
  keys = ["hit@1", "hit@3", "hit@5", "ndcg@5", "ndcg@10", "mrr", "hit@1_lnorm", "gen_hit@1"]
  rows = [("A-LLMRec", "")] + [(BASELINES[b][0] if b in BASELINES else b, f"baselines/{b}/")
                                 for b in baselines]
  lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for label, base in rows:
    vals = [metrics.get(f"{base}{prefix}{k}") for k in keys]
    lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.4f}"
                                              for v in vals) + " |")
  return "\n".join(lines)


def paper_deviations(config) -> list[str]:
  """`section.field=value` of every stage-2 / LLM field where `config` differs from the
  paper's values (configs/base.py): which variant ran."""
  from configs import base  # pylint: disable=import-outside-toplevel
  paper = base.get_base_config()
  out = []
  for section in ("stage2", "llm"):
    for k, v in config[section].items():
      if k in ("eval_every", "eval_users", "log_every", "ckpt_every", "path", "remat",
               "matmul_dtype") or k not in paper[section]:
        continue
      if v != paper[section][k]:
        out.append(f"{section}.{k}={v}")
  return out


def reading(metrics: dict, baselines: list[str], prefix: str, config) -> str:
  """Two or three lines that say what the table means: chance, the popularity count, the
  x_u- and context-shuffle checks, and which variant ran."""
  num_c = 20
  lines = [f"Chance is hit@1 {1 / num_c:.2f} (the target among {num_c} candidates)"]
  pop = metrics.get(f"baselines/popularity/{prefix}hit@1")
  lines[0] += (f"; ranking by popularity count alone gives {pop:.3f}." if pop is not None
               else ".")
  diag = f"diag/{prefix}hit@1"
  if diag in metrics:
    parts = [f"{metrics[diag]:.3f} with the user's own x_u"]
    for suffix, what in (("_user_shuffled", "another user's x_u"),
                         ("_context_shuffled", "another user's x_u and history")):
      if diag + suffix in metrics:
        parts.append(f"{metrics[diag + suffix]:.3f} with {what} "
                     f"(drop {metrics[diag] - metrics[diag + suffix]:.3f})")
    lines.append("A-LLMRec reads its user: hit@1 " + ", ".join(parts) + ".")
  dev = paper_deviations(config)
  lines.append("Variant: " + ("the paper's (configs/base.py)." if not dev else
                              "the paper's except " + ", ".join(dev) + "."))
  return "\n".join(lines)


TEXT_ONLY = ("LLM-Only", "TALLRec")     # models whose prompts carry no soft token


def write_results(path: pathlib.Path, metrics, baselines, prefix, es, builder, ds, examples,
                  num_examples: int, genre: dict | None = None, config=None):
  parts = [f"# A-LLMRec results ({ds.name}, {int(metrics['eval/num_users'])} users, "
           f"20 candidates)", "", results_table(metrics, baselines, prefix), ""]
  if config is not None:
    parts += [reading(metrics, baselines, prefix, config), ""]
  diag = f"diag/{prefix}"
  if f"{diag}hit@1" in metrics:
    parts += ["## Does A-LLMRec use its soft tokens? (ranking, same users)", "",
              "| input | hit@1 | MRR | target loss |", "|---|---|---|---|"]
    for label, suffix in (("true", ""), ("x_u shuffled across users", "_user_shuffled"),
                          ("x_u and history shuffled across users", "_context_shuffled"),
                          ("item tokens permuted", "_items_permuted")):
      if diag + "hit@1" + suffix not in metrics:
        continue
      parts.append(f"| {label} | {metrics[diag + 'hit@1' + suffix]:.4f} | "
                   f"{metrics[diag + 'mrr' + suffix]:.4f} | "
                   f"{metrics[diag + 'loss' + suffix]:.4f} |")
    parts.append("")
  for name, res in examples.items():
    if not res.get("texts"):
      continue
    parts.append(f"## {name}: examples")
    for b in range(min(num_examples, len(es.users))):
      text = builder.prompt_text(es.history[b], es.prompt_candidates[b], ds.titles,
                                 soft=name not in TEXT_ONLY, user_token="[UserRep]")
      parts += [f"- user {int(es.users[b])}", f"  - prompt: `{text}`",
                f"  - generated: `{res['texts'][b]}`",
                f"  - target: `{ds.titles[int(es.targets[b])]}`"]
    parts.append("")
  if genre is not None:
    m = genre["metrics"]
    parts += [f"## Genre question ({int(m['genre/num_users'])} users; precision / recall of "
              "the genre names against the held-out items' genres)", "",
              "| answer | precision | recall | genres named |", "|---|---|---|---|"]
    for label, key in (("A-LLMRec", "allmrec"), ("LLM-Only", "llm_only"),
                       ("history top-3 genres", "history")):
      parts.append(f"| {label} | {m[f'genre/{key}/precision']:.4f} | "
                   f"{m[f'genre/{key}/recall']:.4f} | {m[f'genre/{key}/named']:.2f} |")
    parts.append("")
    for b in range(min(num_examples, len(genre["users"]))):
      parts.append(f"- user {genre['users'][b]} (held-out genres: "
                   f"{', '.join(genre['held_out'][b]) or '-'})")
      for label in ("A-LLMRec", "LLM-Only"):
        parts.append(f"  - {label}: `{genre['answers'][label][b]}`")
    parts.append("")
  path.write_text("\n".join(parts))


def stage1_tables(config, workdir: pathlib.Path, ds, cf_model, cf_params) -> dict[str, np.ndarray]:
  """The item tables stage 2 can feed to F_I, from the trained stage 1 and the CF model:
  joint = f_I^enc(E) (paper), text = f_T^enc(SBERT(text)) (A-LLMRec SBERT), cf = E."""
  from allmrec_jax.trainers import stage1 as stage1_lib  # pylint: disable=import-outside-toplevel
  cf_table = np.asarray(stage1_lib.cf_item_table(cf_model, cf_params), np.float32)
  s1 = stage1_lib.load_trained_stage1(config, workdir, cf_dim=cf_table.shape[1])
  tables = {"cf": cf_table,
            "joint": np.asarray(stage1_lib.joint_item_embeddings(
                s1.models, s1.params, source="cf", item_table=cf_table), np.float32)}
  tables["text"] = text_item_table(s1, config, ds)
  return tables


STAGE1_TABLE_KEYS = ("cf", "joint", "text")


def save_stage1_tables(config, workdir, path, keys=STAGE1_TABLE_KEYS) -> dict[str, np.ndarray]:
  """Writes `keys` of the stage-1 item tables (`stage1_tables`) of a run folder whose cf
  and stage1 are finished to `path` (.npz, no pickle), so that a machine without the
  stage-1 checkpoint (or SBERT) can train stage 2 from them; returns them."""
  from allmrec_jax.data import prepare  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import cf as cf_lib  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir).expanduser()
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
  tables = stage1_tables(config, workdir, ds, cf_model, {"params": cf_params})
  tables = {k: tables[k] for k in keys}
  np.savez(path, **tables)
  return tables


def load_stage1_tables(path, num_rows: int | None, keys=STAGE1_TABLE_KEYS,
                       flag: str = "tables") -> dict[str, np.ndarray]:
  """The float32 item tables `keys` of a `save_stage1_tables` file, each checked to be 2-D
  with `num_rows` rows (the dataset's items + padding; None: any); a missing array or a
  wrong shape is a one-line error naming `--flag=path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{flag}={path}: no such file")
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in keys if k not in f]
    if missing:
      raise ValueError(f"--{flag}={path}: missing arrays {missing} (has {sorted(f)})")
    tables = {k: np.asarray(f[k], np.float32) for k in keys}
  check_stage1_tables(tables, num_rows, f"--{flag}={path}")
  return tables


def check_stage1_tables(tables: dict[str, np.ndarray], num_rows: int | None,
                        source: str) -> None:
  """Each table 2-D with `num_rows` rows (None: any); else a one-line error naming
  `source`."""
  for k, t in tables.items():
    if t.ndim != 2 or num_rows not in (None, t.shape[0]):
      raise ValueError(f"{source}: {k!r} has shape {t.shape}, expected "
                       f"[{num_rows} rows, dim] (this dataset's items + padding)")


def text_item_table(s1, config, ds) -> np.ndarray:
  """float32[N+1, latent] f_T^enc(SBERT(item text)) of `ds`'s items under a trained stage 1
  (`stage1.load_trained_stage1`): the joint embedding of items the CF model never saw."""
  from allmrec_jax.trainers import stage1 as stage1_lib  # pylint: disable=import-outside-toplevel
  ids, mask = stage1_lib.item_text_table(ds, s1.tokenizer, config.sbert.max_len)
  return np.asarray(stage1_lib.joint_item_embeddings(
      s1.models, s1.params, source="text", text_ids=ids, text_mask=mask), np.float32)


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
  """Runs `config.stages` in order on `config.data`; returns the last stage's metrics."""
  from allmrec_jax.data import prepare  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir).expanduser()
  validate_config(config)
  stages = _stages(config)
  save_config(config, workdir)
  ds = prepare.prepare_dataset(config.data)
  logging.info("dataset %s: %s", ds.name, ds.statistics())
  return run_stages(config, workdir, ds, stages)


def run_stages(config, workdir: pathlib.Path, ds, stages: list[str]) -> dict:
  """Runs `stages` (of cf, stage1, stage2) on dataset `ds` in `workdir`; returns the last
  stage's metrics (a finished stage is restored, not rerun)."""
  from allmrec_jax.trainers import cf as cf_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage1 as stage1_lib  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rules = sharding.axis_rules(config.mesh.logical_axis_rules)
  out: dict = {}
  if "cf" in stages:
    _, _, out = cf_lib.train_and_evaluate(config, workdir, ds)
  cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
  cf_variables = {"params": cf_params}
  if "stage1" in stages:
    out = stage1_lib.train_and_evaluate(config, workdir, ds, cf_model, cf_params)
  if "stage2" in stages:
    tables = stage1_tables(config, workdir, ds, cf_model, cf_variables)
    out = run_stage2(config, workdir, ds, cf_model=cf_model, cf_params=cf_variables,
                     tables=tables, mesh=mesh, rules=rules)
  return out
