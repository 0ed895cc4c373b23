r"""Where the stage-2 training step's time goes: a jax.profiler trace of a few steps, each
executed XLA operation attributed to a part of the model by its HLO metadata.

The step is bench_stage2's (SmolLM2-135M-Instruct, MovieLens-100K prompts, batch 4). After
a warm-up, `--steps` steps of one prompt shape are traced (`jax.profiler.trace`, which
writes the trace as `*.trace.json.gz`); the compiled step's HLO text gives every executed
operation's `op_name` (the JAX call path: `jvp(LlamaDecoder)/layers_3/mlp/up/dot_general`
is the forward, `transpose(jvp(...))` the backward). Each operation's time is summed into
one of the parts below; matmul parts also get their FLOP rate (FLOPs from the HLO dot
shapes). "Occupancy" is the step's wall time during which 0, 1 or 2+ of XLA's worker
threads are busy (running an operation, or helping one as a pool worker).

  JAX_PLATFORMS=cpu python benchmarks/profile_stage2.py [--matmul_dtype=bfloat16] \
      [--remat] [--steps=3] [--trace_dir=/tmp/stage2_trace]

Prints a markdown table (operation time per step, share, GFLOP/s) and one JSON line.

Measured idle on a 2-core AMD EPYC with AVX2 (peaks in the same run: JAX float32 131
GFLOP/s, bfloat16 operands 85, PyTorch float32 110), float32, batch 4 x 288 tokens, 3
traced steps (the GFLOP/s column is FLOPs over the operations' own time; the pairs of
projections XLA runs side by side, q with v and gate with up, each count their full time):

| part | op time / step (s) | share | GFLOP / step | GFLOP/s |
| --- | --- | --- | --- | --- |
| LM head (target rows only) | 0.177 | 2% | 15 | 84 |
| projection matmuls (q k v o gate up down) | 6.395 | 57% | 489 | 77 |
| attention matmuls (scores, values) | 1.882 | 17% | 69 | 37 |
| weight layout copies (frozen kernels) | 0.135 | 1% | | |
| softmax | 0.649 | 6% | | |
| attention layout (transpose, reshape, rotary concat) | 1.234 | 11% | | |
| norms (RMSNorm) | 0.138 | 1% | | |
| MLP activation (SiLU x up) | 0.421 | 4% | | |
| soft-token scatter / embedding gather | 0.002 | 0% | | |
| residual adds, masks and other elementwise | 0.063 | 1% | | |
| projectors, loss, optimizer | 0.048 | 0% | 0 | |
| all operations | 11.144 | | 573 | |

Step 8.46 s untraced = 68 GFLOP/s = 52% of the float32 peak; both worker threads are busy
for 8.98 of the 9.21 traced seconds, so the time is in the kernels, not in idle threads.
A forward layer spends ~57 ms in the MLP matmuls, ~27 ms in q/k/v/o, ~15 ms in the two
attention matmuls and ~40 ms in the attention's non-matmul work: XLA:CPU computes the
scores in a [b, kv, s, group*t] layout, transposes them for the mask, materialises the
softmax's normaliser broadcast and writes the probabilities in two layouts (one for the
value matmul, one kept for the backward).

Tried against this step on that machine, none faster beyond noise (same process A/B,
interleaved steps, or back-to-back runs; losses equal within 1e-6):
`jax.nn.dot_product_attention` (implementation "xla"); q pre-scaled with an additive mask
and a hand-written softmax; key/value heads repeated to 4-D per-head einsums; 3-D batched
`dot_general` with the query group folded into the query length (A/B ratio 1.00); XLA:CPU
flags (YNN fusions restricted to dots or individual dots, XNNPACK off). Larger evaluation
batches: see bench_stage2.py.

On a 2-core AVX512-BF16 CPU with bfloat16 operands (peaks JAX float32 ~250, bfloat16
~1,340 GFLOP/s) the attention took over half of the operation time: scores and values
0.66 s per step at 104 GFLOP/s, layout copies 0.59 s, softmax 0.32 s, of 2.97 s. Laying
each kv head's query group and queries out as the rows of one matrix, with keys and
values heads-first, and a softmax whose subtracted row maximum is a constant to autodiff
(layers/attention.py) halved the attention's forward and backward there (42.8 -> 23.8 ms
per layer at [4, 288]): the training step 2.77 -> 2.47 s (bench_stage2.py, median of two
interleaved runs each), an evaluation batch of 8 users 9.43 -> 7.69 s.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_common  # pylint: disable=wrong-import-position  (this folder is sys.path[0])
import bench_stage2  # pylint: disable=wrong-import-position
import peaks  # pylint: disable=wrong-import-position

# (part, predicate on (op_name, instruction name, opcodes of the fused computation)); the
# first match wins.
_PROJ = re.compile(r"/(q|k|v|o|gate|up|down)/dot_general")
PARTS = (
    ("LM head (target rows only)",
     lambda o, n, ops: "logits" in o or "attend" in o),
    ("projection matmuls (q k v o gate up down)",
     lambda o, n, ops: "dot" in ops and _PROJ.search(o) is not None),
    ("attention matmuls (scores, values)",
     lambda o, n, ops: "dot" in ops and "attn/" in o),
    ("weight layout copies (frozen kernels)",
     lambda o, n, ops: o.startswith("frozen[")),
    ("softmax",
     lambda o, n, ops: "attn/" in o and ("reduce_max" in o or "exponential" in ops
                                         or "attn/reduce_sum" in o or "attn/div" in o
                                         or "attn/exp" in o or "attn/sub" in o)),
    ("attention layout (transpose, reshape, rotary concat)",
     lambda o, n, ops: "attn/" in o),
    ("norms (RMSNorm)",
     lambda o, n, ops: "norm" in o),
    ("MLP activation (SiLU x up)",
     lambda o, n, ops: "mlp/" in o),
    ("soft-token scatter / embedding gather",
     lambda o, n, ops: "scatter" in ops or "gather" in ops or "embed" in o),
    ("residual adds, masks and other elementwise",
     lambda o, n, ops: "LlamaDecoder" in o),
    ("projectors, loss, optimizer",
     lambda o, n, ops: True),
)


def parse_hlo(text: str) -> dict[str, dict]:
  """{instruction name: {"op_name", "ops": opcodes inside its fused computation (or its own
  opcode), "flops": matmul FLOPs}} of the entry-level instructions of an HLO module text."""
  comps: dict[str, list[str]] = {}
  cur = entry = None
  for line in text.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
    elif cur is not None and line.startswith("  "):
      comps[cur].append(line)
  shapes: dict[str, list[int]] = {}
  inst_re = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
  for lines in comps.values():
    for line in lines:
      m = inst_re.match(line)
      dims = re.match(r"\(?\w+\[([\d,]*)\]", m.group(2)) if m else None
      if dims:
        shapes[m.group(1)] = [int(x) for x in dims.group(1).split(",") if x]

  def dot_flops(line: str) -> float:
    m = inst_re.match(line)
    out = math.prod(shapes.get(m.group(1), [0]))
    lhs = re.search(r"dot\(%([\w.\-]+)", line)
    cdims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if not (lhs and cdims):
      return 0.0
    lshape = shapes.get(lhs.group(1), [])
    k = math.prod(lshape[int(d)] for d in cdims.group(1).split(",") if d and
                  int(d) < len(lshape))
    return 2.0 * out * k

  info = {}
  for line in comps.get(entry, []):
    m = inst_re.match(line)
    if not m:
      continue
    name, opcode = m.group(1), m.group(3)
    op_name = re.search(r'op_name="([^"]*)"', line)
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = comps.get(called.group(1), []) if called else []
    ops = {inst_re.match(b).group(3) for b in body if inst_re.match(b)} or {opcode}
    flops = sum(dot_flops(b) for b in body if " dot(" in b) if body else (
        dot_flops(line) if opcode == "dot" else 0.0)
    info[name] = {"op_name": op_name.group(1) if op_name else "", "ops": ops,
                  "flops": flops}
  return info


def part_of(entry: dict, name: str) -> str:
  for part, pred in PARTS:
    if pred(entry["op_name"], name, entry["ops"]):
      return part
  return PARTS[-1][0]


def _merged(intervals: list[tuple[float, float]]) -> list[list[float]]:
  out: list[list[float]] = []
  for a, b in sorted(intervals):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return out


def analyse(trace_dir: str, hlo: dict[str, dict], steps: int) -> dict:
  """Per-part operation time, FLOPs and counts per step, and the occupancy of XLA's worker
  threads, from the newest trace under `trace_dir`.

  An operation's time is its wall time on the thread that ran it (operations that run
  concurrently are each counted, so the parts can sum to more than the step). A worker
  thread is busy while it runs an operation or helps one as a pool worker (between the
  thread pool's StartRegion and StopRegion markers)."""
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                       "*.trace.json.gz")))[-1]
  with gzip.open(path, "rt") as f:
    events = json.load(f)["traceEvents"]
  threads = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  workers = sorted((e for e in events if e.get("ph") == "X"
                    and "python" not in threads.get(e["tid"], "python")),
                   key=lambda e: e["ts"])
  ops = [e for e in workers if e["name"] in hlo]
  per_part = collections.defaultdict(lambda: {"s": 0.0, "flops": 0.0, "n": 0})
  for e in ops:
    p = per_part[part_of(hlo[e["name"]], e["name"])]
    p["s"] += e["dur"] / 1e6 / steps
    p["flops"] += hlo[e["name"]]["flops"] / steps
    p["n"] += 1
  busy = collections.defaultdict(list)
  region_start: dict[int, float] = {}
  for e in workers:
    if e["name"] == "ThreadpoolListener::StartRegion":
      region_start[e["tid"]] = e["ts"]
    elif e["name"] == "ThreadpoolListener::StopRegion" and e["tid"] in region_start:
      busy[e["tid"]].append((region_start.pop(e["tid"]), e["ts"]))
  for e in ops:
    busy[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
  # Sweep the merged busy spans of every thread over the traced span.
  pts = sorted(pt for spans in busy.values() for a, b in _merged(spans)
               for pt in ((a, 1), (b, -1)))
  occ: collections.Counter = collections.Counter()
  level = 0
  for (t, d), (t_next, _) in zip(pts, pts[1:]):
    level += d
    occ[min(level, 2)] += (t_next - t) / 1e6 / steps
  return {"parts": dict(per_part), "occupancy_s": dict(occ),
          "traced_s_per_step": (pts[-1][0] - pts[0][0]) / 1e6 / steps if pts else 0.0}


def table(result: dict) -> str:
  parts = result["parts"]
  total = sum(p["s"] for p in parts.values())
  lines = ["| part | op time / step (s) | share | GFLOP / step | GFLOP/s | ops / step |",
           "| --- | --- | --- | --- | --- | --- |"]
  steps = result["steps"]
  for name, _ in PARTS:
    p = parts.get(name)
    if not p:
      continue
    rate = f"{p['flops'] / p['s'] / 1e9:.0f}" if p["flops"] and p["s"] else ""
    gf = f"{p['flops'] / 1e9:.0f}" if p["flops"] else ""
    lines.append(f"| {name} | {p['s']:.3f} | {p['s'] / total:.0%} | {gf} | {rate} | "
                 f"{p['n'] // steps} |")
  occ = result["occupancy_s"]
  lines.append(f"| **all operations** | {total:.3f} | | "
               f"{sum(p['flops'] for p in parts.values()) / 1e9:.0f} | | |")
  lines.append("")
  lines.append(f"Step wall time (traced) {result['traced_s_per_step']:.2f} s; worker "
               f"occupancy: idle {occ.get(0, 0):.2f} s, one thread {occ.get(1, 0):.2f} s, "
               f"two or more {occ.get(2, 0):.2f} s per step.")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=3, help="traced steps")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--matmul_dtype", default="")
  ap.add_argument("--trace_dir", default="", help="default: a temporary folder")
  args = ap.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  from allmrec_jax import sharding  # pylint: disable=import-outside-toplevel
  peak = peaks.machine_peaks()
  print(json.dumps({"peaks": peak}), flush=True)
  c, ds, loaded, builder = bench_stage2.setup(args)
  trainer, state, it = bench_stage2.make_trainer(args, c, ds, loaded, builder)
  first = next(it)[1]
  batches = [first]
  while len(batches) < args.steps + 1:          # one prompt shape: one compiled program
    arrays = next(it)[1]
    if arrays["input_ids"].shape == first["input_ids"].shape:
      batches.append(arrays)
  state, m = trainer.step(state, batches[0])     # compiles
  float(m["train/loss"])
  t = time.perf_counter()
  for arrays in batches[1:]:
    state, m = trainer.step(state, arrays)
    float(m["train/loss"])
  untraced = (time.perf_counter() - t) / args.steps
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="stage2_trace_")
  with jax.profiler.trace(trace_dir):
    for arrays in batches[1:]:
      state, m = trainer.step(state, arrays)
      float(m["train/loss"])
  batch = trainer.put_batch(batches[0])
  with sharding.activate(trainer.mesh, trainer.rules):
    text = trainer._step.lower(state, trainer.frozen, batch,  # pylint: disable=protected-access
                               trainer._rng).compile().as_text()  # pylint: disable=protected-access
  result = analyse(trace_dir, parse_hlo(text), args.steps)
  result.update(steps=args.steps, shape=list(first["input_ids"].shape),
                step_s_untraced=untraced, matmul_dtype=args.matmul_dtype or "float32",
                remat=bool(args.remat), loadavg=bench_common.loadavg(), peaks=peak,
                trace_dir=trace_dir)
  mm = sum(p["flops"] for p in result["parts"].values())
  result["gflop_s_step"] = mm / untraced / 1e9
  result["fraction_of_peak"] = peaks.fraction(result["gflop_s_step"], peak, args.matmul_dtype)
  print(table(result))
  print(f"Untraced step {untraced:.2f} s = {result['gflop_s_step']:.0f} GFLOP/s of matmul "
        f"= {result['fraction_of_peak']:.0%} of the {result['matmul_dtype']} peak.")
  print(json.dumps(result, default=str))


if __name__ == "__main__":
  main()
