"""`PaperTables`: the shared pieces of the paper-table parts (the run, the scored users,
the LLM loaded once, variant runs and their Stage2Runs, rows read back from eval/) and
`run(parts)`, which builds the parts of `PARTS` and writes the document."""

from __future__ import annotations

from collections.abc import Callable
import functools
import json
import os
import pathlib
import time

from absl import logging

from allmrec_jax import config_lib
from allmrec_jax import run_config
from allmrec_jax import sharding
from allmrec_jax.data import prepare
from allmrec_jax.paper_tables import ablations
from allmrec_jax.paper_tables import cold_users
from allmrec_jax.paper_tables import common
from allmrec_jax.paper_tables import cross_domain
from allmrec_jax.paper_tables import efficiency
from allmrec_jax.paper_tables import few_shot
from allmrec_jax.paper_tables import model_agnostic
from allmrec_jax.paper_tables import overall
from allmrec_jax.trainers import baselines as baselines_lib
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import runner
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.trainers import stage2_run as stage2_run_lib

Row = common.Row
BACKBONES = common.BACKBONES
# part name -> fn(suite) -> {"title", "table", "rows"[, "image"]}, in the document's order.
PARTS: dict[str, Callable[[PaperTables], dict]] = {
    "overall": overall.overall,
    "cold_warm": overall.cold_warm,
    "cold_users": cold_users.cold_users,
    "few_shot": few_shot.few_shot,
    "cross_domain": cross_domain.cross_domain,
    "model_agnostic": model_agnostic.model_agnostic,
    "ablations": ablations.ablations,
    "efficiency": efficiency.efficiency,
}
DEFAULT_PARTS = ("overall", "cold_warm", "efficiency")
OVERALL_LLM = overall.OVERALL_LLM
FEW_SHOT_SCOPES = few_shot.FEW_SHOT_SCOPES
CROSS_DOMAIN_USERS = cross_domain.CROSS_DOMAIN_USERS


def parse_parts(text: str) -> list[str]:
  """'overall,cold_warm' -> ['overall', 'cold_warm'] ('all' = every part); an unknown name
  is a one-line error."""
  names = config_lib.as_list(text)
  if names == ["all"]:
    return list(PARTS)
  bad = [p for p in names if p not in PARTS]
  if bad or not names:
    raise ValueError(f"--parts: unknown part(s) {bad or names}; known: {list(PARTS)} or all")
  return names


class PaperTables:
  """The parts of the paper's evaluation on one finished run (see the package docstring).

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
    run_config.validate_config(config)
    if few_shot_scope not in FEW_SHOT_SCOPES:
      raise ValueError(f"--few_shot_scope={few_shot_scope!r}: one of {list(FEW_SHOT_SCOPES)}")
    if cross_domain_user not in CROSS_DOMAIN_USERS:
      raise ValueError(f"--cross_domain_user={cross_domain_user!r}: one of "
                       f"{list(CROSS_DOMAIN_USERS)}")
    if cross_domain_user == "decoded" and config.cf.model == "ncf":
      raise ValueError("--cross_domain_user=decoded: NCF's user side has its own item table "
                       "(user_item_emb) that stage 1 does not reconstruct; use none")
    missing = [s for s in ("cf", "stage1")
               if s not in run_config.finished_stages(self.workdir)]
    if missing:
      raise FileNotFoundError(f"{self.workdir}: stage(s) {', '.join(missing)} not finished; "
                              "run launch/train.py with this config and --workdir first")
    run_config.config_changes(config, self.workdir)   # refuses a config the run was not made with
    bad = [b for b in backbones if b not in BACKBONES]
    if bad:
      raise ValueError(f"--backbones: unknown {bad}; known: {list(BACKBONES)}")
    bad = [b for b in overall_llm if b not in OVERALL_LLM]
    if bad:
      raise ValueError(f"--overall_llm: unknown {bad}; known: {list(OVERALL_LLM)}")
    self.overall_llm = tuple(b for b in OVERALL_LLM if b in overall_llm)
    self.few_shot_scope = few_shot_scope
    self.config = common.overridden(config, {"eval.max_users": users} if users else {})
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
    self._runs: dict[str, stage2_run_lib.Stage2Run] = {}

  # ------------------------------------------------------------------ shared pieces
  @functools.cached_property
  def loaded(self):
    """The LLM, loaded once for every stage-2 training and evaluation of the suite."""
    return stage2_run_lib.load_llm(self.config, self.mesh, self.rules)

  def variant_dir(self, name: str) -> pathlib.Path:
    return self.out / name

  def prepare_variant(self, name: str, config, ds, stages: list[str],
                      share_cf: bool = False) -> pathlib.Path:
    """Runs `stages` of a variant run in tables/<name>/ (with the run's CF model when
    `share_cf`); returns its folder."""
    wd = self.variant_dir(name)
    wd.mkdir(parents=True, exist_ok=True)
    if share_cf and not (wd / "cf").exists():
      os.symlink(os.path.relpath(self.workdir / "cf", wd), wd / "cf")
    run_config.save_config(config, wd)
    runner.run_stages(config, wd, ds, stages)
    return wd

  def cached_run(self, name: str, build: Callable[[], stage2_run_lib.Stage2Run]
                 ) -> stage2_run_lib.Stage2Run:
    """The Stage2Run `name`, built by `build()` the first time."""
    if name not in self._runs:
      self._runs[name] = build()
    return self._runs[name]

  def stage2_run(self, name: str, config=None, workdir=None, ds=None,
                 es: eval_lib.EvalSet | None = None) -> stage2_run_lib.Stage2Run:
    """A Stage2Run of a (variant) run, scoring `es` (default: the suite's users), its
    evaluations kept in tables/eval/<name>/."""
    def build():
      cfg = config or self.config
      wd = workdir or self.workdir
      data = ds or self.ds
      cf_model, cf_params = cf_lib.load_trained_cf(cfg, wd, data)
      cf_vars = {"params": cf_params}
      tables = item_tables_lib.item_tables(cfg, wd, data, cf_model, cf_vars)
      scored = self.es if es is None else es
      return stage2_run_lib.Stage2Run(
          cfg, wd, data, cf_model=cf_model, cf_params=cf_vars, item_tables=tables,
          loaded=self.loaded, es=scored,
          user_rep=stage2_lib.user_representations(cf_model, cf_vars, scored.seq),
          eval_dir=self.out / "eval" / name, mesh=self.mesh, rules=self.rules)
    return self.cached_run(name, build)

  def llm_row(self, name: str, key: str, label: str, run_fn, evaluate_fn) -> Row:
    """The per-user results `evaluate_fn(run)` of `key` on variant `name`, computed once
    (run_fn builds the variant's Stage2Run only when the result is not stored)."""
    path = self.out / "eval" / name / f"{key}.json"
    if not path.exists():
      evaluate_fn(run_fn())
    return common.saved_row(label, path)

  def baseline_row(self, name: str, key: str, run_fn=None) -> Row:
    run_fn = run_fn or (lambda: self.stage2_run("base"))
    baseline = baselines_lib.BASELINES[key]
    return self.llm_row(name, key, baseline.label, run_fn,
                        lambda run: baseline.score(run, ""))

  def allmrec_row(self, name: str, label: str, run_fn) -> Row:
    return self.llm_row(name, "allmrec", label, run_fn,
                        lambda run: baselines_lib.evaluate_allmrec(run, "")[0])

  def cf_backbone(self, backbone: str):
    """(config, workdir) of the run with CF backbone `backbone` (its CF trained on demand
    in tables/backbone_<name>/ unless it is the run's own)."""
    if backbone == self.config.cf.model:
      return self.config, self.workdir
    config = common.overridden(self.config, {"cf.model": backbone})
    return config, self.prepare_variant(f"backbone_{backbone}", config, self.ds, ["cf"])

  def cf_row(self, backbone: str, label: str | None = None) -> Row:
    config, wd = self.cf_backbone(backbone)
    return self.trained_cf_row(label or BACKBONES[backbone], config, wd, self.ds)

  def trained_cf_row(self, label: str, config, wd, ds, es=None) -> Row:
    """The CF model trained in `wd` on `ds`, scored on `es` (default: the suite's users)."""
    es = self.es if es is None else es
    model, params = cf_lib.load_trained_cf(config, wd, ds)
    return common.scored_row(label, es, eval_lib.cf_scores(model, {"params": params}, es))

  def popularity_row(self, ds=None, es=None) -> Row:
    es = self.es if es is None else es
    return common.scored_row("popularity", es,
                             eval_lib.popularity_scores(ds or self.ds, es))

  # ------------------------------------------------------------------ output
  def run(self, parts: list[str], command: str = "") -> pathlib.Path:
    """Builds `parts` (finished ones are read back), writes each part's json/md and
    workdir/tables.md with every finished part; returns that file."""
    self.out.mkdir(parents=True, exist_ok=True)
    for part in parts:
      t0 = time.perf_counter()
      logging.info("tables: %s", part)
      result = PARTS[part](self)
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
