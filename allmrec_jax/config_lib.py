"""Frozen, typed views of the config sections the trainers read.

`configs/base.py` is the one place defaults live. Each trainer turns its `ConfigDict`
section into a frozen dataclass here with `section()`: every field must be present and
every key known, so a misspelt or missing field fails at start with one line naming it
(no `.get(key, default)` fallbacks in the trainers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def as_list(value: Any) -> list[str]:
  """A list-valued config field as a list: "a, b,c" -> ["a", "b", "c"] (blank items
  dropped; "" -> []); a list or tuple is taken as it is, each item stripped. The one
  parser of `stages`, `eval.baselines`, `eval.diagnostics` and `llm.lora_targets`."""
  items = value if isinstance(value, (list, tuple)) else str(value).split(",")
  return [s for s in (str(v).strip() for v in items) if s]


def section(cls: type[T], config: Any, name: str, **outside: Any) -> T:
  """cls built from `config.<name>`; `outside` fills the fields read from other sections.

  Raises ValueError (one line) naming missing and unknown fields of `config.<name>`.
  """
  if name not in config:
    raise ValueError(f"config has no section {name!r} (see configs/base.py)")
  sec = config[name]
  keys = set(sec.keys())
  fields = {f.name for f in dataclasses.fields(cls)} - set(outside)
  missing, unknown = sorted(fields - keys), sorted(keys - fields)
  if missing or unknown:
    parts = []
    if missing:
      parts.append("missing " + ", ".join(f"config.{name}.{k}" for k in missing))
    if unknown:
      parts.append("unknown " + ", ".join(f"config.{name}.{k}" for k in unknown))
    raise ValueError("; ".join(parts) + " (the fields are those of configs/base.py)")
  return cls(**{k: sec[k] for k in fields}, **outside)


@dataclasses.dataclass(frozen=True)
class Stage2Config:
  """`config.stage2` (configs/base.py documents each field)."""
  lr: float
  b1: float
  b2: float
  batch_size: int
  num_epochs: int
  num_history: int
  num_candidates: int
  positions_per_user: int
  max_steps: int
  max_title_tokens: int
  len_bucket: int
  bos: str
  first_token: str
  item_slot: str
  user_at_answer: bool
  eval_every: int
  eval_users: int
  log_every: int
  ckpt_every: int
  item_source: str
  item_standardize: bool
  user_match_weight: float
  user_match_temperature: float
  user_match_negatives: str
  user_match_batch: int
  train_lora: bool
  use_user: bool
  use_items: bool
  schedule: str
  warmup_frac: float
  grad_accum: int
  curriculum: str
  curriculum_frac: float
  two_step_steps: int
  history_drop: float
  history_drop_unit: str

  @classmethod
  def from_config(cls, config) -> Stage2Config:
    return section(cls, config, "stage2")


@dataclasses.dataclass(frozen=True)
class CFTrainConfig:
  """`config.cf` (configs/base.py documents each field)."""
  model: str
  hidden_dim: int
  num_blocks: int
  num_heads: int
  dropout: float
  lr: float
  b1: float
  b2: float
  batch_size: int
  num_epochs: int
  eval_every: int
  ckpt_every: int
  patience: int
  select_metric: str
  loss: str
  maxlen: int
  conv_blocks: int
  dilations: tuple
  kernel_size: int
  mlp_layers: int
  drop_remainder: bool
  grad_clip: float
  grad_splits: int
  eval_batch_size: int
  progress: bool

  @classmethod
  def from_config(cls, config) -> CFTrainConfig:
    return section(cls, config, "cf")
