"""A run's config against its run folder: what is refused before anything trains
(`validate_config`), which stages to run (`stages_of`), and the rerun policy
(`config_changes`, `save_config`): a finished stage is never silently reused under a
config that would have produced something else."""

from __future__ import annotations

import json
import pathlib

from allmrec_jax import config_lib
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.trainers import baselines as baselines_lib
from allmrec_jax.trainers import loop as loop_lib
from allmrec_jax.trainers import stage1 as stage1_lib
from allmrec_jax.trainers import stage2_options

STAGES = ("cf", "stage1", "stage2")


def stages_of(config) -> list[str]:
  """config.stages as a list; an unknown stage is a one-line error."""
  stages = config_lib.as_list(config.stages)
  bad = [s for s in stages if s not in STAGES]
  if bad:
    raise ValueError(f"--config.stages: unknown stage(s) {bad}; known: {list(STAGES)}")
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
  stages_of(config)
  for build in (config_lib.CFTrainConfig.from_config, stage1_lib.Stage1Config.from_config,
                config_lib.Stage2Config.from_config):
    try:
      built = build(config)
      if isinstance(built, config_lib.Stage2Config):   # schedule, curriculum, two-step
        stage2_options.validate_options(built)
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
  if "tallrec" in config_lib.as_list(config.eval.baselines) and not has_lora:
    problems.append("--config.eval.baselines=tallrec needs --config.llm.lora_rank > 0 and "
                    "--config.llm.lora_targets")
  try:
    baselines_lib.baselines_of(config)
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
  done = [s for s in STAGES if loop_lib.finished(workdir / s) is not None]
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
