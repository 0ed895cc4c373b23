r"""Stage-2 speed: our jitted training step and evaluation vs the original code's way.

Ours (SmolLM2-135M-Instruct fp32, MovieLens-100K prompts, 20 candidates, 10 history items):
  * training: `Stage2Trainer.step` at batch 4 (the paper's), prompts built by the
    vectorised `PromptBuilder` (timed with the step), non-pad tokens/s;
  * evaluation: `LLMEvaluator.evaluate` = ranking of the 20 candidates by likelihood AND
    greedy generation of exactly --new_tokens tokens (EOS ignored, the worst case), one
    prompt prefill for both, at the config's eval batch; users/s.
The peer (benchmarks/torch_peer.py): `stage2` and `generate --ignore-eos` (transformers
with `inputs_embeds`, per-sample prompt building, full LM head, padding to the longest)
run as subprocesses in the same invocation, so both sides see the same machine state.

FLOP accounting (what the hardware executes, padding included): a forward costs
2 * (non-embedding weights) per token + attention (4 * L * layers * width per token); the
training backward computes input gradients only (the LLM is frozen: no weight gradients),
about one forward more, plus one more forward when layers are rematerialised. The peaks
(`peaks.py`: JAX float32 and bfloat16-operand matmuls and PyTorch float32 at SmolLM2's MLP
shapes) are measured in the same process; `fraction_of_peak` is against the JAX peak of
the run's operand dtype, the peer's (approximate: its FLOPs counted like ours, per non-pad
token) against PyTorch's.

Run (idle machine; the whole thing takes ~6 minutes; the peer needs `accelerate` to read
the GGUF: `.venv/bin/pip install -e '.[bench]'`):
  JAX_PLATFORMS=cpu python benchmarks/bench_stage2.py

Measured idle on a 2-core AMD EPYC with AVX2 and no AVX-512 (bfloat16 operands are slower
than float32 there), SmolLM2-135M float32, one run (log results/bench_stage2_avx2.log);
peaks in the same run: JAX float32 112 GFLOP/s, JAX bfloat16 78, PyTorch float32 108:
                         ours                          peer (PyTorch, 2 threads)   ratio
  training, batch 4      9.38 s/step, 117 non-pad      8.36 s/step, 129 non-pad    0.91x
                         tok/s; 62 GFLOP/s = 55% of    tok/s (63% of PyTorch's
                         the float32 peak (79% of      peak on the same FLOP
                         the bfloat16 peak)            accounting)
  evaluation, batch 8    3.28 s/user (ranking 20 +     6.78 s/user (generation     2.07x
                         generating 64 tokens; ~150    of 64 tokens only)
                         GFLOP/user, ~46 GFLOP/s =
                         41% of the float32 peak)
Evaluation batches of 16 and 32 (`--eval_batch`, same log): 3.59 and 3.44 s/user, no gain:
per user the prompt prefill (~60 GFLOP) and the packed scoring of the 20 answers (70-80,
LM head included) outweigh the 64 decode steps (~19), so more users per decode step buys
little. Where the training step's time goes: benchmarks/profile_stage2.py.
Earlier figures on a 2-core AVX512-BF16 machine (JAX float32 peak 210 GFLOP/s; logs
results/bench_stage2{,_bf16,_fp32}.log, an earlier external peer script): float32 5.20
s/step and 1.72 s/user vs the peer's 5.20 s/step and 3.93 s/user; bfloat16 matmuls 3.75
s/step (1.38x) and 1.23 s/user (3.19x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_common  # pylint: disable=wrong-import-position  (this folder is sys.path[0])
import peaks  # pylint: disable=wrong-import-position

def setup(args):
  from configs import ml100k  # pylint: disable=import-outside-toplevel
  from allmrec_jax.data import prepare  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2_run  # pylint: disable=import-outside-toplevel
  from allmrec_jax.weights import llm as llm_weights  # pylint: disable=import-outside-toplevel
  c = ml100k.get_config()
  ds = prepare.prepare_dataset(c.data)
  loaded = llm_weights.load_llm(None, dtype="float32", remat=args.remat,
                                matmul_dtype=args.matmul_dtype)
  builder = stage2_run.prompt_builder(ds, loaded.tokenizer, c.stage2)
  return c, ds, loaded, builder


def make_trainer(args, c, ds, loaded, builder):
  """(trainer, state, batch iterator) of the stage-2 step at `args.batch`: random user
  representations and item table (speed does not depend on their values)."""
  import jax  # pylint: disable=import-outside-toplevel
  from allmrec_jax.data import sampling  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models import projectors as proj_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2  # pylint: disable=import-outside-toplevel
  ex = stage2.training_examples(ds, maxlen=c.data.maxlen, num_history=c.stage2.num_history)
  rng = np.random.default_rng(0)
  rep = rng.normal(size=(len(ex.users), c.cf.hidden_dim)).astype(np.float32)
  table = rng.uniform(size=(ds.num_items + 1, c.stage1.latent_dim)).astype(np.float32)
  starts, ends = ds.train_bounds()
  index = sampling.ExclusionIndex.from_ranges(starts, ends, ds.seq_items, ds.num_items)
  width = loaded.config.embed_dim
  proj = proj_lib.Stage2Projectors(table.shape[1], rep.shape[1], width)
  params = stage2.init_projectors(proj, jax.random.PRNGKey(0), table.shape[1], rep.shape[1])
  trainer = stage2.Stage2Trainer(llm=loaded.module, llm_params={"params": loaded.params},
                                 projectors=proj, item_table=table,
                                 optimizer=stage2.make_optimizer(
                                     c.stage2, 1000))    # a schedule needs a length; speed does not
  state = trainer.init_state(params)
  it = stage2.iterate_batches(ex, rep, builder, ds, index, batch_size=args.batch,
                              num_candidates=c.stage2.num_candidates, seed=0, epoch=0)
  return trainer, state, it


def bench_train(args, c, ds, loaded, builder, peak):
  trainer, state, it = make_trainer(args, c, ds, loaded, builder)
  times, nonpad, padded, lens = [], [], [], []
  for i in range(args.warmup + args.iters):
    t = time.perf_counter()
    _, arrays = next(it)                         # prompt assembly is timed with the step
    state, m = trainer.step(state, arrays)
    float(m["train/loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
      nonpad.append(int(arrays["attention_mask"].sum()))
      padded.append(int(arrays["attention_mask"].size))
      lens.append(int(arrays["attention_mask"].shape[1]))
  med = statistics.median(times)
  passes = 3 if args.remat else 2                # forward + input-gradient backward (+ remat)
  flops = statistics.fmean(passes * peaks.llm_forward_flops(loaded.config, p, l)
                           for p, l in zip(padded, lens))
  return {"step_s_median": med, "step_s_min": min(times),
          "nonpad_tokens_per_s": statistics.fmean(nonpad) / med,
          "nonpad_tokens_per_step": statistics.fmean(nonpad),
          "padded_tokens_per_step": statistics.fmean(padded),
          "gflop_per_s": flops / med / 1e9,
          "fraction_of_peak": peaks.fraction(flops / med / 1e9, peak, args.matmul_dtype),
          "remat": bool(args.remat), "shapes": sorted(trainer.compiled_shapes)}


def bench_eval(args, c, ds, loaded, builder, peak):
  from allmrec_jax.models import projectors as proj_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import evaluate  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  bs = args.eval_batch or c.eval.batch_size
  es = evaluate.make_eval_set(ds, "test", maxlen=c.data.maxlen,
                              num_history=c.eval.num_history,
                              max_users=bs * (args.eval_batches + 1), seed=0)
  rng = np.random.default_rng(0)
  rep = rng.normal(size=(len(es.users), c.cf.hidden_dim)).astype(np.float32)
  table = rng.uniform(size=(ds.num_items + 1, c.stage1.latent_dim)).astype(np.float32)
  proj = proj_lib.Stage2Projectors(table.shape[1], rep.shape[1], loaded.config.embed_dim)
  params = stage2.init_projectors(proj, jax.random.PRNGKey(0), table.shape[1], rep.shape[1])
  ev = evaluate.LLMEvaluator(llm=loaded.module, llm_params={"params": loaded.params},
                             tokenizer=loaded.tokenizer, builder=builder, titles=ds.titles,
                             projectors=proj, item_table=table,
                             batch_size=bs, max_new_tokens=args.new_tokens,
                             repetition_penalty=c.eval.repetition_penalty, eos_ids=())
  ev.evaluate(params, es.take(slice(0, bs)), rep[:bs], desc="warm-up")        # compiles
  times, flops = [], []
  for j in range(1, args.eval_batches + 1):
    sl = slice(j * bs, (j + 1) * bs)
    t = time.perf_counter()
    res = ev.evaluate(params, es.take(sl), rep[sl], desc="timed")
    times.append(time.perf_counter() - t)
    assert all(len(x) for x in res["texts"])
    # The shapes this batch ran at (the evaluator's own padding rules), for the FLOPs.
    sub = es.take(sl)
    prompt_len = ev._batch(sub, rep[sl], "recommend")["input_ids"].shape[1]  # pylint: disable=protected-access
    _, cont_mask = builder.continuations(sub.prompt_candidates, soft=True)
    packed = ev.packed_len(cont_mask)
    flops.append(peaks.evaluation_flops(loaded.config, bs, prompt_len, packed,
                                        args.new_tokens))
  med = statistics.median(times)
  gflop_s = statistics.fmean(f / t for f, t in zip(flops, times)) / 1e9
  return {"batch": bs, "batch_s_median": med, "s_per_user": med / bs,
          "users_per_s": bs / med, "new_tokens": args.new_tokens,
          "gflop_per_user": statistics.fmean(flops) / bs / 1e9, "gflop_per_s": gflop_s,
          "fraction_of_peak": peaks.fraction(gflop_s, peak, args.matmul_dtype),
          "protocols": "ranking of 20 candidates + greedy generation (EOS ignored)"}


def run_peer(cmd_name: str, extra: list[str]) -> dict:
  from allmrec_jax import assets  # pylint: disable=import-outside-toplevel
  gguf = str(assets.get_asset("smollm2-135m"))
  return bench_common.run_peer(
      [cmd_name, "--llm", "smollm2", "--llm-dir", os.path.dirname(gguf),
       "--llm-gguf", os.path.basename(gguf), "--data-dir", str(assets.get_asset("ml-100k"))]
      + extra)


def main():
  from allmrec_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.reexec_with_huge_pages()    # as the launchers do
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4, help="training batch (paper: 4)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=6)
  ap.add_argument("--remat", action="store_true", help="rematerialise decoder layers")
  ap.add_argument("--eval_batch", type=int, default=0, help="0 = config.eval.batch_size")
  ap.add_argument("--eval_batches", type=int, default=3, help="timed evaluation batches")
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--skip_peer", action="store_true")
  ap.add_argument("--matmul_dtype", default="",
                  help="config.llm.matmul_dtype ('' = float32; 'bfloat16' = mixed precision)")
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--skip_eval", action="store_true")
  args = ap.parse_args()
  result = {"loadavg_before": bench_common.loadavg(),
            "matmul_dtype": args.matmul_dtype or "float32"}
  peak = peaks.machine_peaks()
  result["peaks"] = peak
  print(json.dumps({"peaks": peak}), flush=True)
  c, ds, loaded, builder = setup(args)
  if not args.skip_train:
    result["ours_train"] = bench_train(args, c, ds, loaded, builder, peak)
    print(json.dumps({"ours_train": result["ours_train"]}, default=str), flush=True)
  if not args.skip_eval:
    result["ours_eval"] = bench_eval(args, c, ds, loaded, builder, peak)
    print(json.dumps({"ours_eval": result["ours_eval"]}), flush=True)
  if not args.skip_peer:
    if not args.skip_train:
      p = run_peer("stage2", ["--batch-size", str(args.batch)])
      result["peer_train"] = {k: p.get(k) for k in ("nonpad_tokens_per_s", "step_s",
                                                    "machine_load", "error", "cmd")}
      if "nonpad_tokens_per_s" in p:
        result["train_speedup"] = (result["ours_train"]["nonpad_tokens_per_s"]
                                   / p["nonpad_tokens_per_s"])
        # The peer's FLOP rate on the same padded-token accounting, against torch's peak.
        result["peer_train"]["fraction_of_torch_peak"] = (
            result["ours_train"]["gflop_per_s"] / result["train_speedup"]
            / peak["torch_float32_gflop_s"]) if peak["torch_float32_gflop_s"] else None
    if not args.skip_eval:
      p = run_peer("generate", ["--batch-size", "2", "--ignore-eos",
                                "--max-new-tokens", str(args.new_tokens)])
      result["peer_generate"] = {k: p.get(k) for k in ("users_per_s", "s_per_user_median",
                                                       "machine_load", "error", "cmd")}
      if "users_per_s" in p:
        result["eval_speedup"] = result["ours_eval"]["users_per_s"] / p["users_per_s"]
  result["loadavg_after"] = bench_common.loadavg()
  print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
  main()
