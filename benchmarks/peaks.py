"""The machine's matmul peaks, measured in the benchmark's own process.

Machines of one kind differ by CPU generation (AVX2 vs AVX512-BF16, core counts), so a
speed figure is stated beside the peaks measured in the same run: a jitted JAX matmul in
float32 and with bfloat16 operands (float32 accumulation, how `*.matmul_dtype="bfloat16"`
runs), and a PyTorch float32 matmul with the peer's thread count, each at SmolLM2-135M's
MLP shapes for a batch of four prompts ([1120, 576] x [576, 1536] and back).

  python benchmarks/peaks.py          # prints one JSON line
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np

SHAPES = ((1120, 576, 1536), (1120, 1536, 576))      # (m, k, n) of the two MLP matmuls


def _median_seconds(fn, runs: int) -> float:
  fn()                                                # warm-up (and compile)
  ts = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _flops() -> float:
  return float(sum(2 * m * k * n for m, k, n in SHAPES))


def jax_peak(dtype: str = "float32", runs: int = 15) -> float:
  """GFLOP/s of a jitted matmul pair with `dtype` operands (float32 accumulation)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  ops = [(jnp.asarray(rng.normal(size=(m, k)), dtype), jnp.asarray(rng.normal(size=(k, n)),
                                                                    dtype))
         for m, k, n in SHAPES]
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))

  def run():
    for a, b in ops:
      f(a, b).block_until_ready()
  return _flops() / _median_seconds(run, runs) / 1e9


def torch_peak(threads: int = 2, runs: int = 15) -> float | None:
  """GFLOP/s of the same matmuls in PyTorch float32 with `threads` threads (None without
  torch)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  before = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    g = torch.Generator().manual_seed(0)
    ops = [(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g))
           for m, k, n in SHAPES]

    def run():
      for a, b in ops:
        torch.mm(a, b)
    return _flops() / _median_seconds(run, runs) / 1e9
  finally:
    torch.set_num_threads(before)


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_peaks(torch_threads: int = 2) -> dict:
  """{"cpu", "cpu_count", "jax_float32_gflop_s", "jax_bfloat16_gflop_s",
  "torch_float32_gflop_s", "torch_threads"}."""
  return {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
          "jax_float32_gflop_s": jax_peak("float32"),
          "jax_bfloat16_gflop_s": jax_peak("bfloat16"),
          "torch_float32_gflop_s": torch_peak(torch_threads), "torch_threads": torch_threads}


def llm_forward_flops(cfg, tokens: int, seq_len: int) -> float:
  """Matmul FLOPs of one decoder forward over `tokens` tokens in sequences of `seq_len`
  (2 x the non-embedding weights per token + attention scores and values)."""
  e, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  qkvo = e * cfg.num_heads * cfg.head_dim * 2 + e * cfg.num_kv_heads * cfg.head_dim * 2
  per_token = 2 * n * (qkvo + 3 * e * f) + 4 * n * seq_len * cfg.num_heads * cfg.head_dim
  return per_token * tokens


def evaluation_flops(cfg, batch: int, prompt_len: int, packed_len: int,
                     new_tokens: int) -> float:
  """Matmul FLOPs of one evaluation batch (`scoring.rank_and_generate_fn`): the prompt
  prefill, the packed candidate answers scored against the prompt's cache (LM head on every
  packed row), and `new_tokens` greedy decode steps (LM head on one row each); attention
  of the later passes counted over the window they see."""
  vocab_head = 2 * cfg.hidden_size * cfg.vocab_size
  prefill = llm_forward_flops(cfg, batch * prompt_len, prompt_len)
  scoring = (llm_forward_flops(cfg, batch * packed_len, prompt_len + packed_len)
             + vocab_head * batch * packed_len)
  decode = (llm_forward_flops(cfg, batch * new_tokens, prompt_len + new_tokens)
            + vocab_head * batch * new_tokens)
  return float(prefill + scoring + decode)


def fraction(gflop_s: float, peaks: dict, matmul_dtype: str) -> float:
  """`gflop_s` as a fraction of the JAX peak of the operand dtype the run used."""
  key = "jax_bfloat16_gflop_s" if matmul_dtype == "bfloat16" else "jax_float32_gflop_s"
  return gflop_s / peaks[key]


if __name__ == "__main__":
  print(json.dumps(machine_peaks()))
