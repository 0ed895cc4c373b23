r"""Zero-shot: does the frozen LLM answer with the candidate whose soft token equals [U]?

  .venv/bin/python -m experiments.zero_shot_copy [--trials=12] [--scale=1.0] \
      [--layouts=in_quotes,after_title] [--users=tied,random] [--matmul_dtype=]

No training and no CF model: each trial draws 20 MovieLens-100K titles and 20 random
vectors (Gaussian, `--scale` x the token-embedding standard deviation) as their soft
tokens, picks a target, and sets [U] to an exact copy of the target's vector ("tied") or
to a fresh random vector ("random", the chance control). The prompt is the stage-2
template with a BOS first and two history titles; every candidate answer is scored by its
log-likelihood and the trial is a hit when the target scores highest (chance 1/20).

  after_title  the paper: `... "c_1"[C],"c_2"[C],... The recommendation is ` with [U]
               after the BOS at the start, answer `"title"<eos>`;
  in_quotes    `... "[C]c_1","[C]c_2",... The recommendation is "[U]` (the answer opens
               with the user token), answer `title"<eos>` (configs/ml100k.py).

Prints one JSON line per (layout, user) with hit@1 and the mean number of candidates
scored above the target.
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax.data import prepare
from allmrec_jax.data import prompts
from allmrec_jax.weights import llm as llm_weights
from configs import ml100k

FLAGS = flags.FLAGS
flags.DEFINE_integer("trials", 12, "prompts per (layout, user)")
flags.DEFINE_float("scale", 1.0, "soft-token std in units of the token-embedding std")
flags.DEFINE_list("layouts", ["in_quotes", "after_title"], "prompt layouts")
flags.DEFINE_list("users", ["tied", "random"], "tied: [U] = the target's vector; random")
flags.DEFINE_integer("candidates", 20, "candidates per prompt")
flags.DEFINE_integer("length", 384, "padded sequence length (one compiled program)")
flags.DEFINE_string("matmul_dtype", "", "LLM matmul operands ('' = float32, bfloat16)")
flags.DEFINE_integer("seed", 0, "trial draws")


def main(argv):
  del argv
  cfg = ml100k.get_config()
  ds = prepare.prepare_dataset(cfg.data)
  loaded = llm_weights.load_llm(None, dtype="float32", matmul_dtype=FLAGS.matmul_dtype)
  llm, params, tok = loaded.module, {"params": loaded.params}, loaded.tokenizer
  enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  table = np.asarray(llm.apply(params, jnp.arange(len(tok))[None], method=llm.embed))[0]
  std = float(table.std()) * FLAGS.scale
  t = prompts.get_template(ds.domain)
  c, length, width = FLAGS.candidates, FLAGS.length, 40

  @jax.jit
  def answer_logprob(embeds, mask, pos, ids):
    logits, _ = llm.apply(params, inputs_embeds=embeds, attention_mask=mask)
    logits = jnp.take_along_axis(logits, pos[..., None], axis=1)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[..., None], -1)[..., 0]

  def trial(rng, layout, user):
    items = rng.choice(np.arange(1, ds.num_items + 1), c + 2, replace=False)
    hist, items = items[:2], items[2:]
    vecs = rng.normal(size=(c, table.shape[1])) * std
    j = int(rng.integers(c))
    u_vec = vecs[j] if user == "tied" else rng.normal(size=vecs[0].shape) * std
    in_quotes = layout == "in_quotes"
    segs = [[tok.bos_token_id], u_vec[None], enc(t.user + t.history + " " + ",".join(
        prompts.quoted(ds.titles[i]) for i in hist) + t.middle)]
    for n, i in enumerate(items):
      sep = ' "' if n == 0 else ',"'
      if in_quotes:
        segs += [enc(sep), vecs[n][None], enc(ds.titles[i] + '"')]
      else:
        segs += [enc(sep[:-1] + prompts.quoted(ds.titles[i])), vecs[n][None]]
    if in_quotes:
      segs += [enc(t.end + '"'), u_vec[None]]
      answers = [enc(ds.titles[i] + '"') + [tok.eos_token_id] for i in items]
    else:
      segs += [enc(t.end)]
      answers = [enc(prompts.quoted(ds.titles[i])) + [tok.eos_token_id] for i in items]
    prompt = np.concatenate([table[s] if isinstance(s, list) else s for s in segs], 0)
    embeds = np.zeros((c, length, table.shape[1]), np.float32)
    mask = np.zeros((c, length), np.int32)
    pos = np.zeros((c, width), np.int32)
    ids = np.zeros((c, width), np.int32)
    valid = np.zeros((c, width), np.float32)
    for n, a in enumerate(answers):
      a = a[:width]
      seq = np.concatenate([prompt, table[a]], 0)[:length]
      embeds[n, :len(seq)], mask[n, :len(seq)] = seq, 1
      pos[n, :len(a)] = len(prompt) - 1 + np.arange(len(a))
      ids[n, :len(a)], valid[n, :len(a)] = a, 1
    if len(prompt) + max(len(a) for a in answers) > length:
      raise ValueError(f"--length={length} is shorter than a prompt + answer")
    lp = np.asarray(answer_logprob(jnp.asarray(embeds), jnp.asarray(mask), jnp.asarray(pos),
                                   jnp.asarray(ids)))
    score = (lp * valid).sum(1)
    return float(np.argmax(score) == j), float(np.sum(score > score[j]))

  for layout in FLAGS.layouts:
    for user in FLAGS.users:
      rng = np.random.default_rng(FLAGS.seed)
      t0 = time.time()
      res = np.asarray([trial(rng, layout, user) for _ in range(FLAGS.trials)])
      print(json.dumps({"layout": layout, "user": user, "trials": FLAGS.trials,
                        "scale": FLAGS.scale, "hit@1": round(float(res[:, 0].mean()), 4),
                        "candidates_above_target": round(float(res[:, 1].mean()), 3),
                        "chance": 1 / c, "seconds": round(time.time() - t0, 1)}),
            flush=True)


if __name__ == "__main__":
  app.run(main)
