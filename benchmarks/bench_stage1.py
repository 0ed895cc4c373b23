"""Stage-1 training speed: JAX (SBERT fine-tuned / frozen) vs the original PyTorch pattern.

  python benchmarks/bench_stage1.py                 # batch 60, ML-100K, all-MiniLM-L6-v2
  python benchmarks/bench_stage1.py --skip-peer --iters 5
  python benchmarks/bench_stage1.py --matmul-dtype=bfloat16   # mixed precision (ml100k default)

Times one jitted `stage1` train step (frozen SASRec forward, SBERT forward/backward on the
positive and negative item texts, both auto-encoders, 4 losses, Adam on the trainable tree)
at batch 60 users, after warm-up (compilation excluded), and runs
the PyTorch peer benchmarks/torch_peer.py with `stage1` (the original code's computation:
per-step tokenisation, SBERT micro-batches of 60, an Adam step per micro-batch) in the same
run on the same data. Prints one JSON line; the target is JAX >= 3x the peer's users/s.
Both use a randomly initialised SASRec (speed does not depend on its weights). The JAX
step follows configs/ml100k.py (packed texts, compact word-embedding Adam) except the SBERT
matmul precision, float32 unless --matmul-dtype is given.

The figures below were taken with an earlier, external peer script of the same
computation (and without the peaks of peaks.py); `torch_peer.py` replaces it.
Latest (idle, 2-core AVX512-BF16 CPU): float32 0.408 s per step =
147 users/s vs the peer's 62.4 (2.36x); --matmul-dtype=bfloat16 0.268 s = 224 users/s vs
60.4 (3.71x). Raw lines in results/bench_stage1.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

import bench_common  # this folder is sys.path[0]
import peaks
from allmrec_jax import assets
from allmrec_jax.data import pipelines
from allmrec_jax.data import prepare
from allmrec_jax.models import cf as cf_lib
from allmrec_jax.trainers import stage1
from allmrec_jax.trainers import steps
from allmrec_jax.weights import sbert as sbert_lib
from configs import ml100k



def _cpu_busy():
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:]]
  return v[0] + v[1] + v[2] + v[5] + v[6], sum(v)   # busy, total jiffies


def _own_cpu():
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class Load:
  """CPU time used by OTHER processes during a window (cores), and the load average."""

  def __enter__(self):
    self.b0, _ = _cpu_busy()
    self.o0, self.t0 = _own_cpu(), time.time()
    return self

  def __exit__(self, *a):
    b1, _ = _cpu_busy()
    hz = os.sysconf("SC_CLK_TCK")
    wall = time.time() - self.t0
    other = (b1 - self.b0) / hz - (_own_cpu() - self.o0)
    self.report = {"other_procs_cpu_cores_mean": round(max(other, 0.0) / max(wall, 1e-9), 3),
                   "loadavg_1m_end": os.getloadavg()[0], "window_s": round(wall, 1)}


def bench_jax(freeze: bool, ds, config, sb, cf_model, cf_vars, warmup: int, iters: int):
  config.stage1.freeze_sbert = freeze
  cfg = stage1.Stage1Config.from_config(config)
  table = stage1.cf_item_table(cf_model, cf_vars)
  models = stage1.make_models(table.shape[-1], sb.module, cfg.latent_dim)
  ids, mask = stage1.item_text_table(ds, sb.tokenizer, cfg.text_max_len)
  trainable = stage1.init_trainable(models, jax.random.key(0), sb.params, freeze)
  trainable = jax.tree.map(jnp.array, trainable)   # own copies (the step donates them)
  tx = stage1.make_optimizer(cfg)
  vocab = (stage1.compact_vocab(ids, sb.module)
           if cfg.compact_vocab and not freeze else None)
  opt_state = stage1.init_opt_state(tx, trainable, vocab)
  frozen = {"cf": cf_vars, "item_table": table}
  t_pre = 0.0
  if freeze:
    t = time.perf_counter()
    frozen["text_table"] = jax.block_until_ready(
        stage1.sbert_embed_all(sb.module, sb.params, ids, mask, 256))
    t_pre = time.perf_counter() - t
  else:
    frozen["text_ids"], frozen["text_mask"] = jnp.asarray(ids), jnp.asarray(mask)
  step = stage1.make_train_step(models, cf_model, cfg, tx, vocab=vocab)
  state = steps.new_state(trainable, opt_state)
  data = pipelines.stage1_dataset(ds, batch_size=cfg.batch_size, maxlen=cfg.maxlen, seed=0,
                                  num_epochs=100, drop_remainder=True)
  rows = stage1.packing_rows(mask, cfg.batch_size) if (cfg.pack_texts and not freeze) else None
  key = jax.random.key(1)
  times, losses = [], []
  with Load() as load:
    for i in range(warmup + iters):
      b = data[i]
      b = {k: b[k] for k in ("seq", "pos", "neg", "mask")}
      t = time.perf_counter()
      if rows is not None:   # host-side packing of the 120 texts (timed with the step)
        b = stage1.pack_batch_texts(b, ids, mask, rows)
      state, m = step(state, frozen, b, key)
      loss = float(m["train/loss"])   # blocks
      if i >= warmup:
        times.append(time.perf_counter() - t)
        losses.append(loss)
  med = statistics.median(times)
  return {"mode": "frozen" if freeze else "finetune", "step_s_median": med,
          "step_s_min": min(times), "users_per_s": cfg.batch_size / med,
          "item_texts_per_s": 2 * cfg.batch_size / med, "text_tokens": int(ids.shape[1]),
          "precompute_sbert_s": t_pre, "packed_rows": rows,
          "compact_vocab_rows": None if vocab is None else int(vocab.rows.shape[0]),
          "matmul_dtype": sb.module.config.matmul_dtype or sb.module.config.dtype, "loss_first_last": [losses[0], losses[-1]],
          "machine_load": load.report}


def bench_peer(args):
  res = bench_common.run_peer(
      ["stage1", "--batch-size", str(args.batch_size),
       "--data-dir", os.path.expanduser(args.data_dir),
       "--sbert-path", str(assets.get_asset("all-minilm-l6-v2")),
       "--warmup", str(args.peer_warmup), "--iters", str(args.peer_iters),
       "--threads", str(args.threads)])
  if "error" in res:
    return res
  return {"users_per_s": res["users_per_s"], "step_s_median": res["step_s"]["median"],
          "machine_load": res.get("machine_load"), "cmd": res["cmd"]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch-size", type=int, default=60)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=8)
  ap.add_argument("--frozen-iters", type=int, default=30)
  ap.add_argument("--peer-warmup", type=int, default=2)
  ap.add_argument("--peer-iters", type=int, default=5)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--data-dir", default="~/.cache/allmrec_jax/recbole-1.2.1")
  ap.add_argument("--skip-peer", action="store_true")
  ap.add_argument("--matmul-dtype", default="",
                  help="config.sbert.matmul_dtype ('' = float32; 'bfloat16' = mixed precision)")
  ap.add_argument("--dense-vocab", action="store_true",
                  help="config.stage1.compact_vocab=False (dense word-embedding Adam)")
  ap.add_argument("--skip-frozen", action="store_true")
  ap.add_argument("--out", default=None, help="also append the JSON line to this file")
  args = ap.parse_args()

  config = ml100k.get_config()
  config.stage1.batch_size = args.batch_size
  config.stage1.compact_vocab = not args.dense_vocab
  ds = prepare.prepare_dataset(config.data)
  cf = dict(config.cf)
  cf["maxlen"] = config.data.maxlen
  cf_model = cf_lib.make_cf_model(cf, ds.num_items)
  seq = jnp.ones((1, config.data.maxlen), jnp.int32)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  cf_vars = nn.unbox(cf_model.init(jax.random.key(0), seq, seq, seq))
  sb = sbert_lib.load_sbert(None, matmul_dtype=args.matmul_dtype)

  result = {"bench": "stage1", "batch_size": args.batch_size, "device": str(jax.devices()[0]),
            "peaks": peaks.machine_peaks(torch_threads=args.threads),
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
  result["jax_finetune"] = bench_jax(False, ds, config, sb, cf_model, cf_vars, args.warmup,
                                     args.iters)
  if not args.skip_frozen:
    result["jax_frozen"] = bench_jax(True, ds, config, sb, cf_model, cf_vars, args.warmup,
                                     args.frozen_iters)
  if not args.skip_peer:
    result["torch_peer"] = bench_peer(args)
    if "users_per_s" in result["torch_peer"]:
      p = result["torch_peer"]["users_per_s"]
      result["speedup_finetune"] = result["jax_finetune"]["users_per_s"] / p
      if "jax_frozen" in result:
        result["speedup_frozen"] = result["jax_frozen"]["users_per_s"] / p
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
