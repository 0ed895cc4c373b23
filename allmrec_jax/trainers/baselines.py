"""The models stage 2 is compared with (config.eval.baselines), each a named `Baseline`,
scored on the A-LLMRec evaluation's users and candidates; and A-LLMRec itself.

The LLM baselines are the stage-2 variants of `variants.VARIANTS` (trained in their own
folder, or not at all for LLM-Only); `cf` and `popularity` score the candidates without
an LLM.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import numpy as np

from allmrec_jax import config_lib
from allmrec_jax.trainers import evaluate as eval_lib
from allmrec_jax.trainers import stage2_run as stage2_run_lib
from allmrec_jax.trainers import variants as variants_lib

Stage2Run = stage2_run_lib.Stage2Run
Variant = variants_lib.Variant


@dataclasses.dataclass(frozen=True)
class Baseline:
  """name: its config.eval.baselines key; label: its row in results.md; score(run, prefix):
  its metrics under `prefix`; doc: what it is."""
  name: str
  label: str
  score: Callable[[Stage2Run, str], dict[str, float]]
  doc: str = ""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A trained stage-2 model and the evaluator that scores it: `evaluate(es, user_rep)`."""
  variant: Variant
  params: Any
  evaluator: eval_lib.LLMEvaluator

  def evaluate(self, es: eval_lib.EvalSet, user_rep: np.ndarray | None, **kw):
    return self.evaluator.evaluate(self.params, es, user_rep, **kw)

  def generate_texts(self, es: eval_lib.EvalSet, user_rep: np.ndarray | None, **kw):
    return self.evaluator.generate_texts(self.params, es, user_rep, **kw)


def evaluate_variant(run: Stage2Run, prefix: str = "", *, variant: Variant,
                     users: np.ndarray | None = None) -> dict[str, float]:
  """`variant` trained (or restored) in its folder (`users`: on these users' examples only)
  and evaluated on the run's users like A-LLMRec; kept as eval/<variant.name>.json."""
  def evaluate(trained):
    params, table = trained
    r = run.evaluator(variant, table).evaluate(
        params, run.es, run.user_rep if variant.soft else None, desc=f"eval {variant.label}")
    return r, eval_lib.llm_metrics(r, prefix)
  return run.evaluated(variant.name, variant.label, evaluate,
                       prepare=lambda: run.train_variant(variant, users=users))


def evaluate_allmrec(run: Stage2Run, prefix: str) -> tuple[dict[str, float], TrainedModel]:
  """A-LLMRec (the configured stage 2, trained or restored in stage2/) on the run's users:
  (metrics under `prefix`, the trained model)."""
  variant = variants_lib.configured(run.cfg)
  params, table = run.train_variant(variant)
  model = TrainedModel(variant, params, run.evaluator(variant, table))

  def evaluate(_):
    res = model.evaluate(run.es, run.user_rep, desc="eval A-LLMRec")
    return res, eval_lib.llm_metrics(res, prefix)
  return run.evaluated("allmrec", "A-LLMRec", evaluate), model


def _cf_scores(run: Stage2Run, prefix: str) -> dict[str, float]:
  return eval_lib.ranking_metrics(eval_lib.cf_scores(run.cf_model, run.cf_params, run.es),
                                  prefix)


def _popularity_scores(run: Stage2Run, prefix: str) -> dict[str, float]:
  return eval_lib.ranking_metrics(eval_lib.popularity_scores(run.ds, run.es), prefix)


def _variant_baseline(name: str) -> Baseline:
  v = variants_lib.VARIANTS[name]
  return Baseline(name, v.label, functools.partial(evaluate_variant, variant=v), v.doc)


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("cf", "CF backbone", _cf_scores, "The CF backbone's scores of the candidates."),
    Baseline("popularity", "popularity count", _popularity_scores,
             "Each candidate's number of training interactions."),
    *(_variant_baseline(n) for n in ("llm_only", "mlp_llm", "tallrec", "sbert", "no_user",
                                     "no_items", "random_items")),
)}


def baselines_of(config) -> list[str]:
  """config.eval.baselines as a list; an unknown name is a one-line error."""
  names = config_lib.as_list(config.eval.baselines)
  bad = [b for b in names if b not in BASELINES]
  if bad:
    raise ValueError(f"--config.eval.baselines: unknown baseline(s) {bad}; known: "
                     f"{sorted(BASELINES)}")
  return names
