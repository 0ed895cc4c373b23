r"""Stage 2 on one GPU: the oracle user token vs the method, BOS first vs the authors' order.

What it measures. Each arm trains fresh stage-2 projectors (the same initialisation, the
same batches; the config's stage-2 options: Adam at config.stage2.lr under its schedule
over --steps, the LoRA adapters when train_lora, the catalog match term, history_drop;
staged plans, curriculum and two_step_steps, are refused) on the faithful training prompts
(20 candidates, 10 history items) for up to --steps steps, and ranks the 20 stored
validation candidates of --eval_users seeded users by likelihood (no generation) before
training, every --eval_every steps and at the end. Arms:

  oracle             [UserRep] carries the CF item embedding of the example's own target
                     (training and evaluation; as probe_stage2.py --user=oracle), prompt
                     start config.stage2.bos="first". The answer is written in the soft
                     tokens: this measures whether the frozen LLM learns, within the
                     budget, to read it from the [UserRep] / [CandidateEmb] match.
  method_bos_first   the method (CF user representation x_u, the stage-1 joint item
                     table), bos="first": a fixed first token, then [U].
  method_user_first  the method with bos="after_user": [U], then the BOS (the authors'
                     order, the soft token at position 0).

The prompt layout fields config.stage2.item_slot / config.stage2.user_at_answer are taken
from the config as given. Writes one JSON line per arm to --out (the file is rewritten;
each line is written when its arm ends) and prints it: arm, steps_done, batch_size, bos,
item_slot, user_at_answer, lr and the other options, before/after hit@1/hit@5/mrr, curve
[[step, hit@1], ...], the mean loss of the first and last 20 steps, seconds (the arm's wall
time, compiles included), the accelerator's device_kind, and with --test_users the test
pass ("test": ranking, generation with --test_generate, the x_u and whole-context shuffles,
SASRec's and popularity's hit@1 on the same users).

Training. Each arm trains with the product's loop (trainers/loop.run: the stage-2 trainer's
step, the stage-2 batches, the ranking above as the loop's evaluation) in a scratch folder
that is deleted at the end.

Time budget. --time_budget_s counts from the start of main() (loading the data, models and
checkpoints included, the Python imports not). Each arm gets the budget still left divided
by the arms still to run. The loop pauses every --check_every steps (a checkpoint in the
scratch folder, from which it resumes); the arm stops there once the next --check_every
steps (at the step time the loop measured last) and a final ranking (as long as the latest
one) would end past its share. steps_done and stopped_by_budget say what happened. With
the defaults the whole script is meant to end within 8 minutes on one GPU. The first arm
also pays the compiles (one trainer and one evaluator serve all arms); its share counts
from the end of its first step, so the later arms share what is left.

Run (one GPU):

  ALLMREC_CACHE=/path/to/allmrec_jax_cache python -m experiments.gpu_stage2_arms \
      --config=configs/ml100k_paper.py --workdir=runs/ml100k_paper --out=/tmp/arms.jsonl

  options: --arms=oracle,method_bos_first,method_user_first --steps=1200 --batch_size=32
  --eval_every=300 --eval_users=200 --time_budget_s=420 --check_every=100, and any config
  field, e.g.
  --config.stage2.item_slot=in_quotes --config.stage2.user_at_answer=True.

WORKDIR should hold a finished cf/ and stage1/ (then it is only read); when either is
missing the script first trains both there with runner.train_and_evaluate
(config.stages="cf,stage1"), which takes longer than the budget above.

The device machine. It has no network and receives at most 64 MiB per call, while the
LLM alone (SmolLM2-135M-Instruct Q4_1 GGUF) is 98 MB and stage 1's checkpoint (fine-tuned
SBERT and Adam state) 162 MB. experiments/device_bundle.sh CONFIG WORKDIR packs what this script
needs into two ignored folders: the GGUF split in two, the item tables exported with
--export_tables (then --tables replaces stage 1's checkpoint and SBERT), the cf/ checkpoint,
the dataset cache and the wheels the GPU image lacks; experiments/device_run.sh reassembles
and checks the GGUF there and runs this script on the bundle. Two calls back to back, as
device_bundle.sh says. experiments/NOTES.md has the results of such runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import time
from typing import Any
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from allmrec_jax import checkpointing
from allmrec_jax import logging_utils
from allmrec_jax.data import pipelines
from allmrec_jax.data import prepare
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.trainers import cf as cf_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import runner
from allmrec_jax.trainers import item_tables as item_tables_lib
from allmrec_jax.trainers import stage2_run
from allmrec_jax.trainers import stage2 as stage2_lib
from allmrec_jax.trainers import stage2_options as options_lib
from experiments import _study_io

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=True)
flags.DEFINE_string("workdir", None, "a run folder with finished cf/ and stage1/ (trained "
                    "first when missing; with --tables only cf/ is needed)", required=True)
flags.DEFINE_string("out", None, "JSONL output, one line per arm (rewritten)",
                    required=True)
flags.DEFINE_list("arms", ["oracle", "method_bos_first", "method_user_first"],
                  "arms to run, in order")
flags.DEFINE_integer("steps", 1200, "training steps per arm (at most)")
flags.DEFINE_integer("batch_size", 32, "training batch size (overrides stage2.batch_size)")
flags.DEFINE_integer("eval_every", 300, "rank the validation users every this many steps "
                     "(0 = before and after only)")
flags.DEFINE_integer("eval_users", 200, "seeded validation users ranked")
flags.DEFINE_float("time_budget_s", 420.0, "seconds from the script's start; split across "
                   "the arms still to run")
flags.DEFINE_integer("check_every", 100, "steps between an arm's budget checks (the training "
                     "loop pauses there)")
flags.DEFINE_string("tables", "", "an .npz of the stage-1 item tables (cf, joint) written by "
                    "--export_tables: stage 1's checkpoint (and SBERT) are then not needed")
flags.DEFINE_string("export_tables", "", "write WORKDIR's stage-1 item tables to this .npz "
                    "and exit")
flags.DEFINE_integer("test_users", 0, "after each method arm, rank this many seeded test "
                     "users with the true and the shuffled x_u (0 = skip)")
flags.DEFINE_bool("test_generate", False, "the test pass also generates (generation hit@1)")
flags.DEFINE_float("test_reserve_s", 0.0, "seconds a method arm stops training early to "
                   "leave for its test pass (with --test_users)")
flags.DEFINE_integer("eval_batch_size", 0, "users per LLM evaluation batch (0 = "
                     "config.eval.batch_size)")

TRAIN_CANDIDATES = 20   # the paper's training prompts
TRAIN_HISTORY = 10


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  user: str   # "oracle": CF item embedding of the target; "cf": the CF user representation
  bos: str    # config.stage2.bos


ARMS: dict[str, ArmSpec] = {
    "oracle": ArmSpec(user="oracle", bos="first"),
    "method_bos_first": ArmSpec(user="cf", bos="first"),
    "method_user_first": ArmSpec(user="cf", bos="after_user"),
}


def digest(a: np.ndarray) -> str:
  """A short content hash of an array (equal arrays, equal digests)."""
  a = np.ascontiguousarray(a)
  return hashlib.sha1(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()
                      ).hexdigest()[:12]


TABLE_KEYS = ("cf", "joint")


def export_tables(config, workdir: str | os.PathLike, path: str | os.PathLike) -> dict:
  """Writes the stage-1 item tables of a finished `workdir` to `path` (.npz); returns them."""
  return _study_io.save_item_tables(config, workdir, path, TABLE_KEYS)


def load_tables(path: str | os.PathLike, num_items: int) -> dict[str, np.ndarray]:
  """The item tables of --tables, checked against the dataset."""
  return _study_io.load_item_tables(path, num_items, TABLE_KEYS, flag="tables")


def ensure_cf_stage1(config, workdir: pathlib.Path, need_stage1: bool = True) -> bool:
  """Trains cf/ and stage1/ in `workdir` unless both are finished; True if it trained."""
  if (loop_lib.finished(workdir / "cf") is not None
      and (not need_stage1 or loop_lib.finished(workdir / "stage1") is not None)):
    return False
  c = config.copy_and_resolve_references()
  c.stages = "cf,stage1"
  logging.info("%s lacks a finished cf/ or stage1/: training them", workdir)
  runner.train_and_evaluate(c, workdir)
  return True


def stage2_config(config, bos: str, batch_size: int):
  """config.stage2 of one arm: the given layout, the faithful training prompts."""
  cfg = config.stage2.copy_and_resolve_references()
  cfg.bos = bos
  cfg.batch_size = batch_size
  cfg.num_candidates = TRAIN_CANDIDATES
  cfg.num_history = TRAIN_HISTORY
  return cfg


def test_pass(ev, builder, params, es, user_rep, *, generate: bool, seed: int
              ) -> dict[str, Any]:
  """Test metrics of trained projectors: ranking (and generation) with the true x_u, and
  ranking with x_u, then the whole user context (x_u and history), taken from another user
  (eval_lib.soft_token_diagnostics)."""
  t = time.time()
  ev.builder = builder
  m = eval_lib.llm_metrics(ev.evaluate(params, es, user_rep, generate=generate, desc="test"),
                           "")
  diag = eval_lib.soft_token_diagnostics(
      ev, params, es, user_rep, "", seed, which=("user_shuffled", "context_shuffled"),
      true_metrics={"hit@1": m["hit@1"], "mrr": m["mrr"], "loss": m["target_loss"]})
  out = {k: round(float(v), 4) for k, v in {**m, **diag}.items()}
  out.update(split="test", users=len(es.users), seconds=round(time.time() - t, 1))
  return out


def train_arm(folder: pathlib.Path, name: str, state: dict, step_fn, data, *, steps: int,
              eval_every: int, check_every: int, evaluate,
              out_of_time: Callable[[float], bool]) -> tuple[loop_lib.LoopResult, bool]:
  """Trains one arm with the product's loop in `folder` (its checkpoints and metrics),
  pausing every `check_every` steps; stops there when `out_of_time(seconds the next
  check_every steps take)`. Returns (the loop's last result, stopped by the budget)."""
  manager = checkpointing.make_manager(folder / "ckpt", max_to_keep=1)
  done = 0
  while True:
    pause = done + check_every
    result = loop_lib.run(folder, name=name, state=state, step_fn=step_fn, data=data,
                          total=steps, ckpt_every=check_every, manager=manager,
                          log_every=check_every, evaluate=evaluate,
                          eval_every=eval_every or steps, eval_at_start=True,
                          stop_after=pause if pause < steps else None, progress=False)
    state, done = result.state, result.iteration
    logging.info("%s step %d loss %.4f", name, done, result.record["train/loss"])
    if result.completed:
      return result, False
    if out_of_time(check_every * result.record["train/step_time_s"]):
      return result, True


def run_arms(config, workdir: str | os.PathLike, arms: list[str], *, out_path: str,
             steps: int, batch_size: int, eval_every: int, eval_users: int,
             time_budget_s: float, start_time: float | None = None,
             tables_path: str = "", test_users: int = 0, test_generate: bool = False,
             test_reserve_s: float = 0.0, eval_batch_size: int = 0,
             check_every: int = 100, emit: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs `arms` in order; writes and emits one JSON line per arm; returns the rows."""
  t_start = time.time() if start_time is None else start_time
  unknown = [a for a in arms if a not in ARMS]
  if unknown or not arms:
    raise ValueError(f"--arms: unknown {unknown}; known: {list(ARMS)}")
  if steps < 1 or batch_size < 1 or check_every < 1:
    raise ValueError("--steps, --batch_size and --check_every must be >= 1")
  options_lib.validate_options(config.stage2)
  if options_lib.StepPlan.from_config(config.stage2, total=steps, seed=config.seed,
                                      soft=True).staged:
    raise ValueError("--config.stage2.curriculum / two_step_steps: staged plans are not run "
                     "by this script (launch/train.py runs them)")
  if config.asset_cache_dir:
    os.environ["ALLMREC_CACHE"] = os.path.expanduser(config.asset_cache_dir)
  workdir = pathlib.Path(workdir).expanduser()
  trained_stages = ensure_cf_stage1(config, workdir, need_stage1=not tables_path)

  # Shared by every arm: data, frozen CF model, item tables, LLM, examples, eval users.
  ds = prepare.prepare_dataset(config.data)
  cf_model, cf_params = cf_lib.load_trained_cf(config, workdir, ds)
  cf_vars = {"params": cf_params}
  if tables_path:
    tables = load_tables(tables_path, ds.num_items + 1)
  else:
    tables = item_tables_lib.item_tables(config, workdir, ds, cf_model, cf_vars)
  table = item_tables_lib.item_table_for(
      config.stage2.item_source, tables, config.seed,
      standardize=config.stage2.item_standardize)
  cf_table = tables["cf"]
  loaded = stage2_run.load_llm(config)
  llm, llm_params = loaded.module, {"params": loaded.params}
  ex = stage2_lib.training_examples(ds, maxlen=config.data.maxlen, num_history=TRAIN_HISTORY,
                                    positions_per_user=config.stage2.positions_per_user)
  n_batches = len(ex.users) // batch_size
  if n_batches == 0:
    raise ValueError(f"no training batch: {len(ex.users)} examples < batch size "
                     f"{batch_size}")
  es = eval_lib.make_eval_set(ds, "valid", maxlen=config.data.maxlen,
                              num_history=config.eval.num_history, max_users=eval_users,
                              seed=config.data.candidate_seed)
  reps: dict[str, tuple[np.ndarray, np.ndarray]] = {}   # user kind -> (train, eval) x_u
  for kind in {ARMS[a].user for a in arms}:
    if kind == "oracle":
      reps[kind] = (cf_table[ex.targets], cf_table[es.targets])
    else:
      reps[kind] = (stage2_lib.user_representations(cf_model, cf_vars, ex.seq),
                    stage2_lib.user_representations(cf_model, cf_vars, es.seq))
  es_test, test_rep, test_baselines = None, None, {}
  if test_users and any(ARMS[a].user == "cf" for a in arms):
    es_test = eval_lib.make_eval_set(ds, "test", maxlen=config.data.maxlen,
                                     num_history=config.eval.num_history,
                                     max_users=test_users, seed=config.data.candidate_seed)
    test_rep = stage2_lib.user_representations(cf_model, cf_vars, es_test.seq)
    test_baselines = {
        "cf_hit@1": eval_lib.ranking_metrics(
            eval_lib.cf_scores(cf_model, cf_vars, es_test), "")["hit@1"],
        "popularity_hit@1": eval_lib.ranking_metrics(
            eval_lib.popularity_scores(ds, es_test), "")["hit@1"]}
  index = pipelines.train_exclusion_index(ds)
  device_kind = jax.devices()[0].device_kind
  setup_s = time.time() - t_start
  logging.info("setup %.1fs (cf/stage1 trained here: %s); %d examples, %d eval users, %s",
               setup_s, trained_stages, len(ex.users), len(es.users), device_kind)

  # One trainer and one evaluator per x_u width: their jitted programs (and compiles)
  # serve every arm; an arm brings its own params, prompt builder and x_u.
  cfg0 = stage2_config(config, "first", batch_size)
  shared: dict[int, tuple[Any, Any, Any]] = {}

  def machinery(user_dim: int):
    if user_dim not in shared:
      proj = projectors_lib.Stage2Projectors(table.shape[1], user_dim,
                                             loaded.config.embed_dim)
      trainer = stage2_lib.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj,
                                         item_table=table,
                                         optimizer=options_lib.make_optimizer(cfg0, steps),
                                         **stage2_lib.match_options(cfg0))
      ev = eval_lib.LLMEvaluator(llm=llm, llm_params=llm_params, tokenizer=loaded.tokenizer,
                                 builder=None, titles=ds.titles, projectors=proj,
                                 item_table=table,
                                 batch_size=eval_batch_size or config.eval.batch_size)
      shared[user_dim] = (proj, trainer, ev)
    return shared[user_dim]

  last_rank_s = [0.0]

  def rank(ev, builder, params, eval_rep) -> dict[str, float]:
    t = time.time()
    ev.builder = builder
    res = ev.evaluate(params, es, eval_rep, generate=False, desc="rank")
    m = eval_lib.ranking_metrics(res["scores"], "")
    last_rank_s[0] = time.time() - t
    return {k: round(float(m[k]), 4) for k in ("hit@1", "hit@5", "mrr")}

  def arm_row(i: int, name: str, scratch: pathlib.Path) -> dict[str, Any]:
    spec = ARMS[name]
    t_arm = time.time()
    deadline = t_arm + (t_start + time_budget_s - t_arm) / (len(arms) - i)
    if es_test is not None and spec.user == "cf":
      deadline -= test_reserve_s
    cfg = stage2_config(config, spec.bos, batch_size)
    n_match = stage2_lib.match_batch(cfg)
    builder = stage2_run.prompt_builder(ds, loaded.tokenizer, cfg)
    train_rep, eval_rep = reps[spec.user]
    proj, trainer, ev = machinery(train_rep.shape[1])
    params0 = stage2_lib.init_projectors(proj, jax.random.PRNGKey(config.seed),
                                         table.shape[1], train_rep.shape[1])
    if config.stage2.train_lora:   # LoRA adapters trained with the projectors
      params0["lora"] = lora_lib.init_adapters(llm, llm_params,
                                               jax.random.PRNGKey(config.seed + 1))

    def epoch_batches(epoch: int, start: int):
      for _, arrays in stage2_lib.iterate_batches(ex, train_rep, builder, ds, index,
                                                  batch_size=batch_size,
                                                  num_candidates=TRAIN_CANDIDATES,
                                                  seed=config.seed, epoch=epoch,
                                                  start_batch=start, match_batch=n_match,
                                                  history_drop=float(cfg.history_drop),
                                                  history_drop_unit=cfg.history_drop_unit):
        yield arrays

    ranked: dict[int, dict[str, float]] = {}    # step -> ranking (the loop's evaluations)
    losses: list[jax.Array] = []                 # every step's loss, read at the end

    def evaluate(params, step):
      ranked[step] = rank(ev, builder, params, eval_rep)
      return {f"val/{k}": v for k, v in ranked[step].items()}

    def step_fn(state, arrays):
      nonlocal deadline
      state, metrics = trainer.step(state, arrays)
      losses.append(metrics["train/loss"])
      if i == 0 and len(losses) == 1:
        # The first arm pays the compiles (its first ranking and step): its share of the
        # budget counts from here, so the arms train for about the same time.
        jax.block_until_ready(metrics)
        deadline += time.time() - t_arm
      return state, metrics

    result, stopped = train_arm(
        scratch / name, name, trainer.init_state(params0), step_fn,
        loop_lib.EpochBatches(epoch_batches, n_batches), steps=steps, eval_every=eval_every,
        check_every=check_every, evaluate=evaluate,
        out_of_time=lambda next_s: time.time() + next_s + last_rank_s[0] >= deadline)
    step = result.iteration
    params = jax.device_get(result.state["params"])
    if step not in ranked:
      ranked[step] = rank(ev, builder, params, eval_rep)
    loss = np.asarray(jax.device_get(losses), np.float64)
    row = {"arm": name, "user": spec.user, "steps_requested": steps, "steps_done": step,
           "stopped_by_budget": stopped, "batch_size": batch_size, "bos": cfg.bos,
           "item_slot": cfg.item_slot,
           "user_at_answer": bool(cfg.user_at_answer),
           "item_standardize": bool(cfg.item_standardize), "lr": cfg.lr,
           "train_candidates": TRAIN_CANDIDATES, "train_history": TRAIN_HISTORY,
           "positions_per_user": cfg.positions_per_user, "schedule": cfg.schedule,
           "train_lora": bool(cfg.train_lora), "lora_targets": config.llm.lora_targets,
           "history_drop": float(cfg.history_drop),
           "history_drop_unit": cfg.history_drop_unit, "user_match_weight":
           float(cfg.user_match_weight), "user_match_batch": n_match,
           "eval_split": "valid", "eval_users": len(es.users),
           "eval_users_digest": digest(es.users), "user_rep_digest": digest(eval_rep),
           "before": ranked[0], "after": ranked[step],
           "curve": [[s, m["hit@1"]] for s, m in sorted(ranked.items())],
           "loss_first20": round(float(np.mean(loss[:20])), 4),
           "loss_last20": round(float(np.mean(loss[-20:])), 4),
           "seconds": round(time.time() - t_arm, 1), "setup_seconds": round(setup_s, 1),
           "device_kind": device_kind, "workdir": str(workdir)}
    if es_test is not None and spec.user == "cf":
      row["test"] = test_pass(ev, builder, params, es_test, test_rep,
                              generate=test_generate, seed=config.seed)
      row["test"].update({k: round(float(v), 4) for k, v in test_baselines.items()})
      row["seconds"] = round(time.time() - t_arm, 1)
    return row

  out_file = pathlib.Path(out_path).expanduser()
  out_file.parent.mkdir(parents=True, exist_ok=True)
  out_file.write_text("")
  rows = []
  with tempfile.TemporaryDirectory(prefix="gpu_stage2_arms_") as scratch:
    for i, name in enumerate(arms):
      row = arm_row(i, name, pathlib.Path(scratch))
      line = json.dumps(row)
      with open(out_file, "a") as f:
        f.write(line + "\n")
      emit(line)
      rows.append(row)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging_utils.quiet_libraries()
  t_start = time.time()
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  if FLAGS.export_tables:
    if config.asset_cache_dir:
      os.environ["ALLMREC_CACHE"] = os.path.expanduser(config.asset_cache_dir)
    tables = export_tables(config, FLAGS.workdir, FLAGS.export_tables)
    print(json.dumps({k: list(v.shape) for k, v in tables.items()}), flush=True)
    return
  run_arms(config, FLAGS.workdir, [a.strip() for a in FLAGS.arms if a.strip()],
           out_path=FLAGS.out, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
           eval_every=FLAGS.eval_every, eval_users=FLAGS.eval_users,
           time_budget_s=FLAGS.time_budget_s, start_time=t_start, tables_path=FLAGS.tables,
           test_users=FLAGS.test_users, test_generate=FLAGS.test_generate,
           test_reserve_s=FLAGS.test_reserve_s, eval_batch_size=FLAGS.eval_batch_size,
           check_every=FLAGS.check_every,
           emit=lambda line: print(line, flush=True))


if __name__ == "__main__":
  app.run(main)
