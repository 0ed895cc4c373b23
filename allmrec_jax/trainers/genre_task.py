"""The paper's language-generation task on a run's evaluation users: A-LLMRec and LLM-Only
answer the genre question; scored with `allmrec_jax/genre.py`."""

from __future__ import annotations

import json

from allmrec_jax import genre as genre_lib
from allmrec_jax.trainers import baselines as baselines_lib
from allmrec_jax.trainers import stage2_run as stage2_run_lib
from allmrec_jax.trainers import variants as variants_lib

KEYS = {"A-LLMRec": "allmrec", "LLM-Only": "llm_only", "history top-3 genres": "history"}


def genre_task(run: stage2_run_lib.Stage2Run, model: baselines_lib.TrainedModel) -> dict:
  """The paper's genre question for the first `eval.genre_users` evaluation users, answered
  by A-LLMRec (`model`) and LLM-Only, and the history's top-3 genres as the non-LLM
  reference; genre precision / recall against the held-out items' genres.

  Kept in eval/genre.json; returns it: {"metrics", "answers": {label: [str]}, "users",
  "held_out"}."""
  path = run.eval_dir / "genre.json"
  if path.exists():
    return json.loads(path.read_text())
  n = min(int(run.ecfg.genre_users), len(run.es.users))
  sub, rep = run.es.take(slice(0, n)), run.user_rep[:n]
  llm_only = run.evaluator(variants_lib.VARIANTS["llm_only"])
  answers = {
      "A-LLMRec": model.generate_texts(sub, rep, task="genre", desc="genre A-LLMRec"),
      "LLM-Only": llm_only.generate_texts(None, sub, None, task="genre",
                                          desc="genre LLM-Only"),
      "history top-3 genres": genre_lib.history_genres_answer(run.ds, sub.history)}
  vocab = genre_lib.genre_vocabulary(run.ds.genres)
  ref = genre_lib.held_out_genres(run.ds, sub.users)
  metrics = {"genre/num_users": float(n)}
  for label, texts in answers.items():
    metrics.update(genre_lib.genre_metrics(texts, ref, vocab, f"genre/{KEYS[label]}/"))
  saved = {"metrics": metrics, "answers": answers, "users": sub.users.tolist(),
           "held_out": [sorted(r) for r in ref]}
  run.eval_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(saved))
  return saved
