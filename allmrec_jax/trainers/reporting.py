"""What a run reports: `results.md` (the results table, what it means, the soft-token
diagnostics, example prompts and answers, the genre question) and the lines
`launch/train.py` prints."""

from __future__ import annotations

import pathlib

from allmrec_jax.trainers import baselines as baselines_lib
from allmrec_jax.trainers import variants as variants_lib
from configs import base as base_config


def results_table(metrics: dict, baselines: list[str], prefix: str) -> str:
  """The markdown table of A-LLMRec and `baselines` (metrics under `prefix`)."""
  keys = ["hit@1", "hit@3", "hit@5", "ndcg@5", "ndcg@10", "mrr", "hit@1_lnorm", "gen_hit@1"]
  rows = [("A-LLMRec", "")] + [(baselines_lib.BASELINES[b].label if b in baselines_lib.BASELINES else b,
                                 f"baselines/{b}/") for b in baselines]
  lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for label, base in rows:
    vals = [metrics.get(f"{base}{prefix}{k}") for k in keys]
    lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.4f}"
                                              for v in vals) + " |")
  return "\n".join(lines)


def paper_deviations(config) -> list[str]:
  """`section.field=value` of every stage-2 / LLM field where `config` differs from the
  paper's values (configs/base.py): which variant ran."""
  paper = base_config.get_base_config()
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


# Labels of the models whose prompts carry no soft token.
TEXT_ONLY = tuple(v.label for v in variants_lib.VARIANTS.values() if v.text_only)


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
