"""The paper's tables in miniature, from one run folder (`allmrec-tables`).

`Tables(config, workdir, ...)` takes a run whose CF model and stage 1 are finished (the
`launch/train.py` run of the same config) and builds, part by part, what the paper
reports; every model is scored on the same seeded test users and their 20 stored
candidates (the `eval.*` protocol of stage 2, `users` of them):

- overall: the four CF backbones, popularity, LLM-Only, TALLRec, MLP-LLM, A-LLMRec (SBERT)
  and A-LLMRec: ranking hit@1/5, NDCG@10, MRR and generation hit@1 (+ `overall.png`);
- cold_warm: every overall row on the users whose target is a cold / warm item (bottom /
  top `data.cold_fraction` of items by interaction count);
- cold_users: users held out of every training stage, cut to 3 interactions (2 history,
  1 target; `data.num_cold_users` of them); CF, popularity, LLM-Only and A-LLMRec trained
  again without them;
- few_shot: stage 2 (A-LLMRec, A-LLMRec (SBERT), TALLRec) trained on K seeded users only
  (`few_shot_scope="all"`: the CF model and stage 1 as well, the paper's setting, in which
  the K-user CF model gets its own row);
- cross_domain: trained on one domain and asked about another without fine-tuning; the
  target domain's items get their joint embedding from text (f_T^enc(SBERT(text))); the
  CF model has never seen those items, so by default the models run without the user
  token (`cross_domain_user="decoded"`: x_u from the source CF model over stage 1's
  f_I^dec of those joint embeddings). MovieLens: two disjoint genre groups of the run's
  dataset; Amazon: the run's category -> `cross_domain_target`;
- model_agnostic: A-LLMRec on each CF backbone (CF, stage 1 and stage 2 trained again);
- ablations: stage 1 without the matching / reconstruction / rec loss and with SBERT
  frozen (stage 1 and 2 trained again on the run's CF model); stage 2 without the user
  token, without the joint embeddings, with random joint embeddings;
- efficiency: seconds per training step and per epoch, and per user at inference
  (ranking + generation), A-LLMRec vs TALLRec on this machine.

Everything trained or evaluated is kept under `workdir/tables/` (variant runs, per-user
ranks in `eval/<variant>/<key>.json`), so a rerun reuses finished parts and an interrupted
one resumes; each part writes `<part>.json` and `<part>.md` there, and `workdir/tables.md`
collects the finished parts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time

from absl import logging
import ml_collections
import numpy as np

from allmrec_jax import config_lib
from allmrec_jax import metrics as metrics_lib
from allmrec_jax import sharding
from allmrec_jax.data import prepare
from allmrec_jax.data import scenarios
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import runner
from allmrec_jax.trainers import stage1 as stage1_lib
from allmrec_jax.trainers import stage2 as stage2_lib

FEW_SHOT_SCOPES = ("stage2", "all")
# x_u of the cross-domain target users: "none" (no user token: the source CF model has
# never seen a target item) or "decoded" (the source CF model over stage 1's
# reconstruction f_I^dec(f_T^enc(SBERT(text))) of the target's item embeddings).
CROSS_DOMAIN_USERS = ("none", "decoded")
PARTS = ("overall", "cold_warm", "cold_users", "few_shot", "cross_domain", "model_agnostic",
         "ablations", "efficiency")
DEFAULT_PARTS = ("overall", "cold_warm", "efficiency")
BACKBONES = {"sasrec": "SASRec", "ncf": "NCF", "gru4rec": "GRU4Rec",
             "nextitnet": "NextItNet"}
OVERALL_LLM = ("llm_only", "tallrec", "mlp_llm", "sbert")
STAGE1_ABLATIONS = {
    "no_match": ("w/o L_matching", {"w_match": 0.0}),
    "no_recon": ("w/o L_item-recon & L_text-recon", {"w_item_recon": 0.0,
                                                      "w_text_recon": 0.0}),
    "no_rec": ("w/o L_rec", {"w_rec": 0.0}),
    "frozen_sbert": ("Freeze SBERT", {"freeze_sbert": True}),
}
STAGE2_ABLATIONS = ("no_user", "no_items", "random_items")
COLUMNS = (("hit@1", "hit@1"), ("hit@5", "hit@5"), ("ndcg@10", "NDCG@10"), ("mrr", "MRR"),
           ("gen_hit@1", "gen hit@1"))


def parse_parts(text: str) -> list[str]:
  """'overall,cold_warm' -> ['overall', 'cold_warm'] ('all' = every part); an unknown name
  is a one-line error."""
  names = [p.strip() for p in text.split(",") if p.strip()]
  if names == ["all"]:
    return list(PARTS)
  bad = [p for p in names if p not in PARTS]
  if bad or not names:
    raise ValueError(f"--parts: unknown part(s) {bad or names}; known: {list(PARTS)} or all")
  return names


@dataclasses.dataclass(frozen=True)
class Row:
  """One model's per-user results on an evaluation set: rank int[B] of the target among
  the candidates (0 = first) and gen_hit float[B] (None: no generation protocol)."""
  label: str
  users: np.ndarray
  rank: np.ndarray
  gen_hit: np.ndarray | None = None

  def metrics(self, mask: np.ndarray | None = None) -> dict[str, float]:
    keep = np.ones(len(self.rank), bool) if mask is None else np.asarray(mask, bool)
    out = {"users": float(keep.sum())}
    if keep.any():
      out.update(metrics_lib.metrics_from_ranks(self.rank[keep], (1, 5, 10), prefix=""))
      if self.gen_hit is not None:
        out["gen_hit@1"] = float(np.mean(self.gen_hit[keep]))
    return out


def _scored_row(label: str, es: eval_lib.EvalSet, scores: np.ndarray) -> Row:
  return Row(label, es.users, metrics_lib.rank_of_target(np.asarray(scores, np.float64)))


def _saved_row(label: str, path: pathlib.Path) -> Row:
  saved = json.loads(path.read_text())
  if "rank" not in saved:
    raise ValueError(f"{path}: no per-user ranks (written by an older version); delete it "
                     "to evaluate again")
  gen = saved.get("gen_hit")
  return Row(label, np.asarray(saved["users"]), np.asarray(saved["rank"]),
             None if gen is None else np.asarray(gen, np.float32))


def overridden(config: ml_collections.ConfigDict, overrides: dict[str, object]
               ) -> ml_collections.ConfigDict:
  """A copy of `config` with {"section.field": value} set (references resolved)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      if field not in c[section]:
        raise KeyError(f"config has no field {key}")
      c[section][field] = value
  return c


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.4f}"


def metric_table(rows: list[Row], masks: dict[str, np.ndarray | None] | None = None,
                 columns=COLUMNS) -> tuple[str, list[dict]]:
  """Markdown table of `rows` (one column per metric of `columns`, per mask when given)
  and every metric as records."""
  masks = masks or {"": None}
  header, records, lines = ["model"], [], []
  for name in masks:
    header += [f"{name} {title}".strip() for _, title in columns]
  for row in rows:
    rec, cells = {"model": row.label}, [row.label]
    for name, mask in masks.items():
      m = row.metrics(mask)
      rec[name or "all"] = m
      cells += [_fmt(m.get(key)) for key, _ in columns]
    records.append(rec)
    lines.append(cells)
  return _md_table(header, lines), records


def decoded_user_representations(config, cf_params, s1, text_joint: np.ndarray, ds,
                                 seq: np.ndarray) -> np.ndarray:
  """float32[X, D] x_u of histories `seq` over `ds`'s items, which the CF model (trained on
  another catalogue, `cf_params`) has never seen: its item table is replaced by stage 1's
  reconstruction f_I^dec(e) of their text-derived joint embeddings e = `text_joint`
  (float[N+1, latent], `runner.text_item_table`), row 0 (padding) kept at zero."""
  ae = s1.models.item_ae
  decoded = np.array(ae.apply({"params": s1.params["item_ae"]}, text_joint,
                              method=ae.decode), np.float32)
  decoded[0] = 0.0
  model = cf_lib.make_model(config, ds.num_items)
  params = dict(cf_params)
  params["item_emb"] = {**params["item_emb"], "embedding": decoded}
  return stage2_lib.user_representations(model, {"params": params}, seq)


class Tables:
  """The parts of the paper's evaluation on one finished run (see the module docstring).

  Args:
    config: the run's config (as given to launch/train.py, with the same overrides).
    workdir: the run folder; its `cf` and `stage1` stages must be finished.
    users: test users scored in every table (a seeded subset; 0 = config.eval.max_users).
    few_shot: the K of the few-shot part.
    few_shot_scope: what the few-shot part trains on the K users: "stage2" (stage 2 only,
      on the run's CF model and stage 1) or "all" (the paper's setting: the CF model,
      stage 1 and stage 2, in tables/few_shot<K>_all/, with that CF model's own row).
    backbones: CF backbones of the overall and model-agnostic parts.
    efficiency_steps: timed training steps per model in the efficiency part.
    cross_domain_target: Amazon target-domain dataset spec of the cross-domain part
      ("" = the MovieLens genre split of the run's own dataset).
    cross_domain_user: the target users' x_u in the cross-domain part (CROSS_DOMAIN_USERS).
    overall_llm: the LLM baselines of the overall and cold / warm parts (a subset of
      OVERALL_LLM: each trained one is a stage-2 training).
  """

  def __init__(self, config, workdir, *, users: int = 0, few_shot=(128, 256),
               few_shot_scope: str = "stage2", backbones=tuple(BACKBONES),
               efficiency_steps: int = 20,
               cross_domain_target: str = "", cross_domain_user: str = "none",
               overall_llm=OVERALL_LLM):
    self.workdir = pathlib.Path(workdir).expanduser()
    runner.validate_config(config)
    if few_shot_scope not in FEW_SHOT_SCOPES:
      raise ValueError(f"--few_shot_scope={few_shot_scope!r}: one of {list(FEW_SHOT_SCOPES)}")
    if cross_domain_user not in CROSS_DOMAIN_USERS:
      raise ValueError(f"--cross_domain_user={cross_domain_user!r}: one of "
                       f"{list(CROSS_DOMAIN_USERS)}")
    if cross_domain_user == "decoded" and config.cf.model == "ncf":
      raise ValueError("--cross_domain_user=decoded: NCF's user side has its own item table "
                       "(user_item_emb) that stage 1 does not reconstruct; use none")
    missing = [s for s in ("cf", "stage1") if s not in runner.finished_stages(self.workdir)]
    if missing:
      raise FileNotFoundError(f"{self.workdir}: stage(s) {', '.join(missing)} not finished; "
                              "run launch/train.py with this config and --workdir first")
    runner.config_changes(config, self.workdir)   # refuses a config the run was not made with
    bad = [b for b in backbones if b not in BACKBONES]
    if bad:
      raise ValueError(f"--backbones: unknown {bad}; known: {list(BACKBONES)}")
    bad = [b for b in overall_llm if b not in OVERALL_LLM]
    if bad:
      raise ValueError(f"--overall_llm: unknown {bad}; known: {list(OVERALL_LLM)}")
    self.overall_llm = tuple(b for b in OVERALL_LLM if b in overall_llm)
    self.few_shot_scope = few_shot_scope
    self.config = overridden(config, {"eval.max_users": users} if users else {})
    self.out = self.workdir / "tables"
    self.few_shot_k = tuple(int(k) for k in few_shot)
    self.backbones = tuple(backbones)
    self.efficiency_steps = int(efficiency_steps)
    self.cross_domain_target = cross_domain_target
    self.cross_domain_user = cross_domain_user
    self.ds = prepare.prepare_dataset(self.config.data)
    self.mesh = sharding.make_mesh(tuple(self.config.mesh.shape))
    self.rules = sharding.axis_rules(self.config.mesh.logical_axis_rules)
    ecfg = self.config.eval
    self.es = eval_lib.make_eval_set(self.ds, ecfg.split, maxlen=self.config.data.maxlen,
                                     num_history=ecfg.num_history, max_users=ecfg.max_users,
                                     seed=self.config.data.candidate_seed)
    self._runs: dict[str, runner.Stage2Run] = {}

  # ------------------------------------------------------------------ shared pieces
  @functools.cached_property
  def loaded(self):
    """The LLM, loaded once for every stage-2 training and evaluation of the suite."""
    return runner.load_llm(self.config, self.mesh, self.rules)

  def _variant_dir(self, name: str) -> pathlib.Path:
    return self.out / name

  def _prepare_variant(self, name: str, config, ds, stages: list[str],
                       share_cf: bool = False) -> pathlib.Path:
    """Runs `stages` of a variant run in tables/<name>/ (with the run's CF model when
    `share_cf`); returns its folder."""
    wd = self._variant_dir(name)
    wd.mkdir(parents=True, exist_ok=True)
    if share_cf and not (wd / "cf").exists():
      os.symlink(os.path.relpath(self.workdir / "cf", wd), wd / "cf")
    runner.save_config(config, wd)
    runner.run_stages(config, wd, ds, stages)
    return wd

  def stage2_run(self, name: str, config=None, workdir=None, ds=None,
                 es: eval_lib.EvalSet | None = None, use_cf_user: bool = True
                 ) -> runner.Stage2Run:
    """A Stage2Run of a (variant) run, scoring `es` (default: the suite's users), its
    evaluations kept in tables/eval/<name>/. use_cf_user=False: x_u is zeros (a domain
    the CF model has never seen; the models then run without the user token)."""
    if name in self._runs:
      return self._runs[name]
    config = config or self.config
    workdir = workdir or self.workdir
    ds = ds or self.ds
    cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
    cf_vars = {"params": cf_params}
    tables = runner.stage1_tables(config, workdir, ds, cf_model, cf_vars)
    run = runner.Stage2Run(config, workdir, ds, cf_model=cf_model, cf_params=cf_vars,
                           tables=tables, mesh=self.mesh, rules=self.rules,
                           eval_users=False, loaded=self.loaded)
    run.es = self.es if es is None else es
    run.user_rep = run.user_representations(run.es.seq)
    if not use_cf_user:
      run.user_rep = np.zeros_like(run.user_rep)
    run.eval_dir = self.out / "eval" / name
    self._runs[name] = run
    return run

  def _llm_row(self, name: str, key: str, label: str, run_fn, evaluate_fn) -> Row:
    """The per-user results `evaluate_fn(run)` of `key` on variant `name`, computed once
    (run_fn builds the variant's Stage2Run only when the result is not stored)."""
    path = self.out / "eval" / name / f"{key}.json"
    if not path.exists():
      evaluate_fn(run_fn())
    return _saved_row(label, path)

  def _baseline_row(self, name: str, key: str, run_fn=None) -> Row:
    run_fn = run_fn or (lambda: self.stage2_run("base"))
    return self._llm_row(name, key, runner.BASELINES[key][0], run_fn,
                         lambda run: runner.BASELINES[key][1](run, ""))

  def _allmrec_row(self, name: str, label: str, run_fn) -> Row:
    return self._llm_row(name, "allmrec", label, run_fn,
                         lambda run: runner.evaluate_allmrec(run, "")[0])

  def _cf_backbone(self, backbone: str):
    """(config, workdir) of the run with CF backbone `backbone` (its CF trained on demand
    in tables/backbone_<name>/ unless it is the run's own)."""
    if backbone == self.config.cf.model:
      return self.config, self.workdir
    config = overridden(self.config, {"cf.model": backbone})
    return config, self._prepare_variant(f"backbone_{backbone}", config, self.ds, ["cf"])

  def cf_row(self, backbone: str, label: str | None = None) -> Row:
    config, wd = self._cf_backbone(backbone)
    return self._trained_cf_row(label or BACKBONES[backbone], config, wd, self.ds)

  def _trained_cf_row(self, label: str, config, wd, ds, es=None) -> Row:
    """The CF model trained in `wd` on `ds`, scored on `es` (default: the suite's users)."""
    es = self.es if es is None else es
    model, params = cf_lib.load_trained_cf(config, wd, ds)
    return _scored_row(label, es, eval_lib.cf_scores(model, {"params": params}, es))

  def popularity_row(self, ds=None, es=None) -> Row:
    es = self.es if es is None else es
    return _scored_row("popularity", es, eval_lib.popularity_scores(ds or self.ds, es))

  # ------------------------------------------------------------------ parts
  def overall_rows(self) -> list[Row]:
    rows = [self.cf_row(b) for b in self.backbones]
    rows.append(self.popularity_row())
    rows += [self._baseline_row("base", key) for key in self.overall_llm]
    rows.append(self._allmrec_row("base", "A-LLMRec", lambda: self.stage2_run("base")))
    return rows

  def overall(self) -> dict:
    rows = self.overall_rows()
    table, records = metric_table(rows)
    self._chart(rows, self.out / "overall.png")
    return {"title": f"Overall ({len(self.es.users)} test users, 20 candidates)",
            "table": table, "rows": records, "image": "overall.png"}

  def cold_warm(self) -> dict:
    cold, warm = scenarios.cold_warm_items(self.ds, float(self.config.data.cold_fraction))
    targets = self.es.targets
    masks = {"cold": np.isin(targets, cold), "warm": np.isin(targets, warm)}
    table, records = metric_table(self.overall_rows(), masks,
                                  [c for c in COLUMNS if c[0] in ("hit@1", "mrr",
                                                                  "gen_hit@1")])
    frac = float(self.config.data.cold_fraction)
    return {"title": f"Cold / warm items (targets in the bottom / top {frac:.0%} of items "
                     f"by interactions: {int(masks['cold'].sum())} / "
                     f"{int(masks['warm'].sum())} of {len(targets)} users)",
            "table": table, "rows": records}

  def cold_users(self) -> dict:
    split = scenarios.cold_user_split(self.ds, num_users=int(self.config.data.num_cold_users),
                                      seed=int(self.config.seed))
    wd = self._prepare_variant("cold_users", self.config, split.train, ["cf", "stage1"])
    arrays = split.eval_arrays(maxlen=self.config.data.maxlen,
                               num_history=self.config.eval.num_history)
    users = split.held_out_users if split.held_out_users.size else arrays["user"]
    es = eval_lib.eval_set(users, arrays["seq"], arrays["history"], arrays["candidates"],
                           self.config.data.candidate_seed)
    run_fn = lambda: self.stage2_run("cold_users", workdir=wd, ds=split.train, es=es)
    rows = [self._trained_cf_row(BACKBONES[self.config.cf.model], self.config, wd,
                                 split.train, es),
            self.popularity_row(split.train, es),
            self._baseline_row("cold_users", "llm_only", run_fn),
            self._allmrec_row("cold_users", "A-LLMRec", run_fn)]
    table, records = metric_table(rows)
    return {"title": f"Cold users ({split.num_users} users held out of every training "
                     "stage; 2 history items, 1 target, 20 candidates)",
            "table": table, "rows": records}

  def few_shot_rows(self, k: int) -> list[Row]:
    seed = int(self.config.seed)
    users = scenarios.few_shot_users(self.ds, k, seed=seed)
    if self.few_shot_scope == "stage2":       # the run's CF model and stage 1, stage 2 on K
      name, train_users, rows = "base", users, []
      run_fn = lambda: self.stage2_run("base")
    else:                                     # the paper's: every stage on the K users
      name, train_users = f"few_shot{k}_all", None
      ds_k = scenarios.subset_users(self.ds, users, name=f"{self.ds.name}-fewshot{k}-s{seed}")
      wd = self._prepare_variant(name, self.config, ds_k, ["cf", "stage1"])
      rows = [self._trained_cf_row(f"{BACKBONES[self.config.cf.model]} (K={k})",
                                   self.config, wd, ds_k)]
      run_fn = lambda: self.stage2_run(name, workdir=wd, ds=ds_k)
    for key, label, source, soft in (("tallrec", "TALLRec", None, False),
                                     ("allmrec", "A-LLMRec", None, True),
                                     ("sbert", "A-LLMRec (SBERT)", "text", True)):
      rows.append(self._llm_row(
          name, f"few_shot{k}_{key}", f"{label} (K={k})", run_fn,
          functools.partial(runner.evaluate_variant, key=f"few_shot{k}_{key}",
                            label=f"{label} K={k}", folder=f"stage2_few_shot{k}_{key}",
                            source=source, soft=soft, users=train_users)))
    return rows

  def few_shot(self) -> dict:
    rows = [self.cf_row(self.config.cf.model, f"{BACKBONES[self.config.cf.model]} (all users)")]
    for k in self.few_shot_k:
      rows += self.few_shot_rows(k)
    table, records = metric_table(rows)
    title = ("Few-shot: stage 2 trained on K seeded users (CF model and stage 1 of the run)"
             if self.few_shot_scope == "stage2" else
             "Few-shot: CF model, stage 1 and stage 2 trained on K seeded users only")
    return {"title": title, "table": table, "rows": records}

  def _cross_domain_datasets(self):
    """(source run config, source workdir, source ds, target ds)."""
    if self.cross_domain_target:
      target = overridden(self.config, {"data.dataset": self.cross_domain_target,
                                        "data.path": ""})
      return self.config, self.workdir, self.ds, prepare.prepare_dataset(target.data)
    src, tgt = scenarios.cross_domain_split(self.ds)
    wd = self._prepare_variant("cross_domain", self.config, src, ["cf", "stage1"])
    return self.config, wd, src, tgt

  def cross_domain(self) -> dict:
    config, wd, src, tgt = self._cross_domain_datasets()
    ecfg = config.eval
    es = eval_lib.make_eval_set(tgt, ecfg.split, maxlen=config.data.maxlen,
                                num_history=ecfg.num_history, max_users=ecfg.max_users,
                                seed=config.data.candidate_seed)
    name = "cross_domain"
    src_run = lambda: self.stage2_run("cross_domain_source", workdir=wd, ds=src)
    tgt_run = lambda: self._target_run(config, wd, src, tgt, es)
    rows = [self.popularity_row(tgt, es),
            self._baseline_row(name, "llm_only", tgt_run)]
    use_user = self.cross_domain_user != "none"
    suffix = "" if not use_user else f"_{self.cross_domain_user}_user"
    for key, label, folder, source, soft in (
        ("tallrec", "TALLRec", "stage2_tallrec", None, False),
        ("allmrec" + suffix, "A-LLMRec", "stage2", None, True),
        ("sbert" + suffix, "A-LLMRec (SBERT)", "stage2_sbert", "text", True)):

      def evaluate(run, folder=folder, source=source, soft=soft, label=label, key=key):
        params, _ = src_run().train_variant(folder, source or run.cfg.item_source,
                                            soft=soft)
        ev = (run.evaluator(run.tables["text"], params, use_user=use_user) if soft else
              run.evaluator(proj_params=params, soft=False))

        def score(_, ev=ev, label=label):
          r = ev.evaluate(es, run.user_rep, desc=f"eval {label} (cross-domain)")
          return r, eval_lib.llm_metrics(r, "")
        run.evaluated(key, label, score)
      rows.append(self._llm_row(name, key, label, tgt_run, evaluate))
    table, records = metric_table(rows)
    user = ("no user token" if not use_user else
            "x_u is the source CF model over stage 1's text-decoded item embeddings")
    return {"title": f"Cross-domain: trained on {src.name}, asked about {tgt.name} "
                     f"({len(es.users)} users) without fine-tuning; the target's items get "
                     f"their joint embedding from text; {user}",
            "table": table, "rows": records}

  def _target_run(self, config, wd, src, tgt, es) -> runner.Stage2Run:
    """A Stage2Run over the cross-domain target: its titles and prompts, the source run's
    stage 1 applied to the target's item texts (standardised like the source's F_I input
    when configured); x_u per `cross_domain_user` (zeros with "none": the models then run
    without the user token)."""
    if "cross_domain" in self._runs:
      return self._runs["cross_domain"]
    cf_model, cf_params = cf_lib.load_trained_cf(config, wd, src)
    s1 = stage1_lib.load_trained_stage1(config, wd)
    text = runner.text_item_table(s1, config, tgt)
    cfg = config_lib.Stage2Config.from_config(config)
    table = runner.item_table_for("text", {"text": text}, config.seed,
                                  standardize=cfg.item_standardize)
    run = runner.Stage2Run(config, wd, tgt, cf_model=cf_model,
                           cf_params={"params": cf_params}, tables={"text": table},
                           mesh=self.mesh, rules=self.rules, eval_users=False,
                           loaded=self.loaded)
    run.es = es
    if self.cross_domain_user == "decoded":
      run.user_rep = decoded_user_representations(config, cf_params, s1, text, tgt, es.seq)
    else:
      dim = run.user_representations(np.zeros((1, config.data.maxlen), np.int32)).shape[1]
      run.user_rep = np.zeros((len(es.users), dim), np.float32)
    run.eval_dir = self.out / "eval" / "cross_domain"
    self._runs["cross_domain"] = run
    return run

  def model_agnostic(self) -> dict:
    rows = []
    for b in self.backbones:
      config, wd = self._cf_backbone(b)
      if wd != self.workdir:
        self._prepare_variant(f"backbone_{b}", config, self.ds, ["cf", "stage1"])
      name = "base" if wd == self.workdir else f"backbone_{b}"
      rows.append(self.cf_row(b))
      rows.append(self._allmrec_row(
          name, f"A-LLMRec ({BACKBONES[b]})",
          lambda config=config, wd=wd, name=name: self.stage2_run(name, config, wd)))
    table, records = metric_table(rows)
    return {"title": "Model-agnostic: A-LLMRec on each CF backbone (CF, stage 1 and stage 2 "
                     "trained for each)", "table": table, "rows": records}

  def ablations(self) -> dict:
    base = lambda: self.stage2_run("base")
    rows = [self._allmrec_row("base", "A-LLMRec", base)]
    for key, (label, fields) in STAGE1_ABLATIONS.items():
      config = overridden(self.config, {f"stage1.{f}": v for f, v in fields.items()})
      name = f"stage1_{key}"
      path = self.out / "eval" / name / "allmrec.json"
      wd = self._variant_dir(name)
      if not path.exists():
        self._prepare_variant(name, config, self.ds, ["stage1"], share_cf=True)
      rows.append(self._allmrec_row(
          name, f"stage 1 {label}",
          lambda config=config, wd=wd, name=name: self.stage2_run(name, config, wd)))
    rows += [self._baseline_row("base", key) for key in STAGE2_ABLATIONS]
    table, records = metric_table(rows)
    return {"title": "Ablations (stage 1: trained again on the run's CF model; stage 2: "
                     "the run's stage 1)", "table": table, "rows": records}

  def efficiency(self) -> dict:
    """Seconds per training step (mean after the first logged window, which compiles) and
    per epoch, and per user at inference (rank 20 + generate, compiled shapes), A-LLMRec
    (the run's stage 2, and the paper's frozen LLM when the run trains LoRA) vs TALLRec."""
    path = self.out / "efficiency_raw.json"
    raw = json.loads(path.read_text()) if path.exists() else {}
    models = [("allmrec", "A-LLMRec", {}, True)]
    if self.config.stage2.train_lora:
      models = [("allmrec_frozen", "A-LLMRec (frozen LLM, paper)",
                 {"stage2.train_lora": False}, True),
                ("allmrec", "A-LLMRec (LoRA, this run)", {}, True)]
    models.append(("tallrec", "TALLRec", {}, False))
    for key, label, fields, soft in models:
      if key not in raw:
        raw[key] = {"label": label, **self._time_model(key, fields, soft)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(raw, indent=2))
    rows, records = [], []
    for key, label, _, _ in models:
      r = raw[key]
      records.append(r)
      rows.append([label, f"{r['seconds_per_step']:.3f}", f"{r['seconds_per_epoch']:.1f}",
                   f"{r['seconds_per_user']:.3f}"])
    tall = raw["tallrec"]
    ratios = [f"{raw[k]['label']}: training {tall['seconds_per_epoch'] / raw[k]['seconds_per_epoch']:.2f}x, "
              f"inference {tall['seconds_per_user'] / raw[k]['seconds_per_user']:.2f}x faster than TALLRec"
              for k, *_ in models if k != "tallrec"]
    table = _md_table(["model", "s / step", "s / epoch", "s / user (inference)"], rows)
    return {"title": f"Efficiency ({self.efficiency_steps} timed steps each; paper: A-LLMRec "
                     "2.53x faster in training and 1.71x in inference than TALLRec)",
            "table": table + "\n\n" + "; ".join(ratios) + ".", "rows": records}

  def _time_model(self, key: str, fields: dict, soft: bool) -> dict[str, float]:
    run = self.stage2_run("base")
    steps = self.efficiency_steps
    config = overridden(self.config, {"stage2.max_steps": steps, "stage2.log_every": 1,
                                      "stage2.eval_every": 0, **fields})
    folder = f"tables/efficiency/{key}"
    table = runner.item_table_for(run.cfg.item_source, run.tables, config.seed,
                                  standardize=run.cfg.item_standardize)
    params = stage2_lib.train(config, self.workdir, self.ds, llm=run.loaded.module,
                              llm_params=run.llm_params, builder=run.builder,
                              user_rep_fn=run.user_representations, item_table=table,
                              name=folder, mesh=self.mesh, rules=self.rules, soft=soft)
    lines = [json.loads(x) for x in
             (self.workdir / folder / "metrics.jsonl").read_text().splitlines()]
    per_step = [x["train/step_time_s"] for x in lines if "train/step_time_s" in x]
    timed = per_step[1:] or per_step                 # the first step compiles
    cfg = config_lib.Stage2Config.from_config(config)
    ex = stage2_lib.training_examples(self.ds, maxlen=config.data.maxlen,
                                      num_history=cfg.num_history,
                                      positions_per_user=cfg.positions_per_user)
    steps_per_epoch = len(ex.users) // cfg.batch_size
    ev = (run.evaluator(table, params) if soft else
          run.evaluator(proj_params=params, soft=False))
    bs = int(self.config.eval.batch_size)
    sub = self.es.take(slice(0, min(2 * bs, len(self.es.users))))
    rep = run.user_rep[:len(sub.users)] if soft else None
    ev.evaluate(sub, rep, desc=f"compile {key}")
    t0 = time.perf_counter()
    ev.evaluate(sub, rep, desc=f"time {key}")
    per_user = (time.perf_counter() - t0) / len(sub.users)
    s = float(np.mean(timed))
    return {"seconds_per_step": s, "steps_per_epoch": steps_per_epoch,
            "seconds_per_epoch": s * steps_per_epoch, "seconds_per_user": per_user,
            "timed_users": len(sub.users)}

  # ------------------------------------------------------------------ output
  def _chart(self, rows: list[Row], path: pathlib.Path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    labels = [r.label for r in rows]
    hit1 = [r.metrics()["hit@1"] for r in rows]
    gen = [r.metrics().get("gen_hit@1", 0.0) for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 3.6))
    ax.bar(x - 0.2, hit1, 0.4, label="ranking hit@1")
    ax.bar(x + 0.2, gen, 0.4, label="generation hit@1")
    ax.axhline(1 / 20, color="gray", lw=0.8, ls="--", label="chance (1/20)")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("hit@1")
    ax.set_title(f"{self.ds.name}: {len(self.es.users)} test users, 20 candidates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

  def run(self, parts: list[str], command: str = "") -> pathlib.Path:
    """Builds `parts` (finished ones are read back), writes each part's json/md and
    workdir/tables.md with every finished part; returns that file."""
    self.out.mkdir(parents=True, exist_ok=True)
    for part in parts:
      t0 = time.perf_counter()
      logging.info("tables: %s", part)
      result = getattr(self, part)()
      result["seconds"] = time.perf_counter() - t0
      (self.out / f"{part}.json").write_text(json.dumps(result, indent=2))
      text = f"## {result['title']}\n\n{result['table']}\n"
      if "image" in result:
        text += f"\n![{part}](tables/{result['image']})\n"
      (self.out / f"{part}.md").write_text(text)
    return self.write_document(command)

  def write_document(self, command: str = "") -> pathlib.Path:
    parts = [f"# The paper's tables in miniature ({self.ds.name})", ""]
    if command:
      parts += ["Produced by", "", f"    {command}", ""]
    for part in PARTS:
      md = self.out / f"{part}.md"
      if md.exists():
        parts.append(md.read_text())
    doc = self.workdir / "tables.md"
    doc.write_text("\n".join(parts))
    return doc
