"""CF stage speed: training-epoch time (median) and full evaluation time on MovieLens-100K.

  python benchmarks/bench_cf.py [--model=sasrec] [--epochs=10] [--torch_reference]

Prints one JSON line: the median wall time of a training epoch (the jitted `train_epoch`
over one epoch of pipeline batches: 8 batches of 128 on ML-100K), the same including the
host-side batch sampling, the median time of evaluating every test user under the three
protocols (20 candidates, 100 negatives, full ranking), and with --torch_reference the
median epoch time of a PyTorch SASRec written like pmixer's SASRec.pytorch (same sizes,
same batches) measured in the same process, so the ratio holds on a busy machine too.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peaks  # pylint: disable=wrong-import-position  (this folder)

from allmrec_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from allmrec_jax.data import pipelines  # pylint: disable=wrong-import-position
from allmrec_jax.data import prepare  # pylint: disable=wrong-import-position
from allmrec_jax.trainers import cf as cf_trainer  # pylint: disable=wrong-import-position
from configs import ml100k  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "sasrec", "CF backbone")
flags.DEFINE_integer("epochs", 10, "timed epochs (after one warm-up)")
flags.DEFINE_integer("eval_repeats", 3, "timed evaluations (after one warm-up)")
flags.DEFINE_bool("torch_reference", False, "also time a pmixer-style torch SASRec")
flags.DEFINE_string("data_dir", "", "processed-data dir ('' = config default)")
flags.DEFINE_integer("grad_splits", 0, "config.cf.grad_splits (0 = the ml100k config's)")


def _torch_sasrec_epoch_fn(num_items, d, maxlen, blocks, heads, dropout, lr):
  """A pmixer-style SASRec (torch) and a function running one epoch of its steps."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)

  class FFN(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = torch.nn.Conv1d(d, d, 1)
      self.conv2 = torch.nn.Conv1d(d, d, 1)
      self.drop1 = torch.nn.Dropout(dropout)
      self.drop2 = torch.nn.Dropout(dropout)

    def forward(self, x):
      y = self.drop2(self.conv2(torch.relu(self.drop1(self.conv1(x.transpose(-1, -2))))))
      return y.transpose(-1, -2) + x

  class SASRec(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.item_emb = torch.nn.Embedding(num_items + 1, d, padding_idx=0)
      self.pos_emb = torch.nn.Embedding(maxlen + 1, d, padding_idx=0)
      self.drop = torch.nn.Dropout(dropout)
      self.aln = torch.nn.ModuleList([torch.nn.LayerNorm(d, eps=1e-8) for _ in range(blocks)])
      self.att = torch.nn.ModuleList([torch.nn.MultiheadAttention(d, heads, dropout)
                                      for _ in range(blocks)])
      self.fln = torch.nn.ModuleList([torch.nn.LayerNorm(d, eps=1e-8) for _ in range(blocks)])
      self.ffn = torch.nn.ModuleList([FFN() for _ in range(blocks)])
      self.last = torch.nn.LayerNorm(d, eps=1e-8)

    def forward(self, seq, pos, neg):
      x = self.item_emb(seq) * d ** 0.5
      poss = torch.arange(1, seq.shape[1] + 1)[None].repeat(seq.shape[0], 1) * (seq != 0)
      x = self.drop(x + self.pos_emb(poss))
      tl = (seq == 0)[..., None]
      x = x * ~tl
      mask = ~torch.tril(torch.ones((seq.shape[1], seq.shape[1]), dtype=torch.bool))
      for i in range(blocks):
        xt = x.transpose(0, 1)
        q = self.aln[i](xt)
        out, _ = self.att[i](q, xt, xt, attn_mask=mask)
        x = (q + out).transpose(0, 1)
        x = self.ffn[i](self.fln[i](x)) * ~tl
      h = self.last(x)
      return (h * self.item_emb(pos)).sum(-1), (h * self.item_emb(neg)).sum(-1)

  model = SASRec()
  opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
  bce = torch.nn.BCEWithLogitsLoss()

  def run_epoch(batches):
    model.train()
    for s in range(batches["seq"].shape[0]):
      seq, pos, neg = (torch.from_numpy(batches[k][s].astype(np.int64))
                       for k in ("seq", "pos", "neg"))
      pl, nl = model(seq, pos, neg)
      idx = pos != 0
      loss = bce(pl[idx], torch.ones_like(pl[idx])) + bce(nl[idx], torch.zeros_like(nl[idx]))
      opt.zero_grad()
      loss.backward()
      opt.step()
  return run_epoch


def main(argv):
  del argv
  config = ml100k.get_config()
  config.cf.model = FLAGS.model
  if FLAGS.grad_splits:
    config.cf.grad_splits = FLAGS.grad_splits
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  ds = prepare.prepare_dataset(config.data)
  maxlen, bsz = int(config.data.maxlen), int(config.cf.batch_size)
  mesh, rules = cf_trainer._mesh(config)  # pylint: disable=protected-access
  model = cf_trainer.make_model(config, ds.num_items)
  tx = cf_trainer.make_optimizer(config)
  params = cf_trainer.init_params(model, jax.random.key(0), maxlen, mesh, rules)
  state = cf_trainer._on_mesh({"params": params, "opt_state": jax.jit(tx.init)(params),  # pylint: disable=protected-access
                               "step": jnp.zeros((), jnp.int32)}, mesh)
  pipe = pipelines.cf_train_dataset(ds, batch_size=bsz, maxlen=maxlen, seed=0,
                                    num_epochs=FLAGS.epochs + 2, drop_remainder=False)
  spe = pipelines.steps_per_epoch(ds, bsz, drop_remainder=False)

  def batches(epoch):
    bs = [pipe[epoch * spe + s] for s in range(spe)]
    return {k: np.stack([b[k] for b in bs]) for k in ("seq", "pos", "neg", "mask")}

  epoch = functools.partial(cf_trainer.train_epoch, model=model, tx=tx,
                            loss_fn=losses.CF_LOSSES[config.cf.loss],
                            grad_splits=cf_trainer.grad_splits(config))
  run = jax.jit(lambda st, b: epoch(st, None, b, jax.random.key(1)), donate_argnums=(0,))
  run_t = None
  if FLAGS.torch_reference and FLAGS.model == "sasrec":
    c = config.cf
    run_t = _torch_sasrec_epoch_fn(ds.num_items, c.hidden_dim, maxlen, c.num_blocks,
                                   c.num_heads, c.dropout, c.lr)
    run_t(batches(0))
  state, l = run(state, batches(0))
  jax.block_until_ready(l)
  device_t, total_t, sample_t, torch_t = [], [], [], []
  # With the reference, each JAX epoch is followed by a torch epoch on the same batches, so
  # both sides see the same machine state (its speed drifts by 1.5x over seconds here).
  for e in range(1, FLAGS.epochs + 1):
    t0 = time.perf_counter()
    b = batches(e)
    t1 = time.perf_counter()
    state, l = run(state, b)
    jax.block_until_ready(l)
    t2 = time.perf_counter()
    device_t.append(t2 - t1)
    sample_t.append(t1 - t0)
    total_t.append(t2 - t0)
    if run_t is not None:
      t3 = time.perf_counter()
      run_t(b)
      torch_t.append(time.perf_counter() - t3)
  evaluator = cf_trainer.Evaluator(model, ds, maxlen, int(config.cf.eval_batch_size))
  evaluator.evaluate(state["params"], "test")
  eval_t = []
  for _ in range(FLAGS.eval_repeats):
    t0 = time.perf_counter()
    evaluator.evaluate(state["params"], "test")
    eval_t.append(time.perf_counter() - t0)
  out = {"model": FLAGS.model, "steps_per_epoch": spe, "batch_size": bsz,
         "grad_splits": cf_trainer.grad_splits(config),
         "epoch_s_median": float(np.median(device_t)), "epoch_s_min": float(np.min(device_t)), "epoch_s_all": [round(t, 3) for t in device_t],
         "epoch_with_sampling_s_median": float(np.median(total_t)),
         "sampling_s_median": float(np.median(sample_t)),
         "eval_test_all_protocols_s_median": float(np.median(eval_t)),
         "eval_users": int(ds.eval_users("test").size),
         "devices": jax.device_count(), "load_avg_1m": os.getloadavg()[0],
         "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  if run_t is not None:
    import torch  # pylint: disable=g-import-not-at-top
    out["torch_reference_epoch_s_median"] = float(np.median(torch_t))
    out["torch_reference_epoch_s_all"] = [round(t, 3) for t in torch_t]
    out["torch_threads"] = torch.get_num_threads()
    out["speedup_vs_torch"] = out["torch_reference_epoch_s_median"] / out["epoch_s_median"]
    out["speedup_median_of_pairs"] = float(np.median(np.asarray(torch_t) / np.asarray(device_t)))
  out["peaks"] = peaks.machine_peaks(torch_threads=out.get("torch_threads", 2))
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
