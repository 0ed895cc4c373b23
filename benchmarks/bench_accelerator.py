r"""The paper's LLM on one accelerator: stage-2 training step and evaluation, bfloat16.

  python benchmarks/bench_accelerator.py --model=opt-6.7b            # one GPU/TPU chip
  python benchmarks/bench_accelerator.py --model=opt-6.7b --peer     # + PyTorch, for the ratio
  JAX_PLATFORMS=cpu python benchmarks/bench_accelerator.py --model=tiny   # seconds, on a CPU

Random weights are created ON the device from a seed (`jax.jit` of the init with
`out_shardings`; nothing is downloaded) in bfloat16. Measured:
  * the stage-2 training step (the LLM frozen, gradients and Adam to the projectors F_I,
    F_U only, soft tokens spliced into the input embeddings) at batch 4 / 16 / 32 of
    synthetic prompts with the paper's shape: [U], 10 history and 20 candidate titles each
    followed by its item soft token, the template's words, and the target title + EOS
    (title lengths drawn around the Amazon titles' token count, --title_tokens), right
    padded to a multiple of 32 as `data/prompts.py` pads;
  * evaluation per user: one prompt prefill, the 20 candidates ranked by likelihood
    (packed pass, `scoring.rank_and_generate_fn`) and --new_tokens greedy tokens.
Each measurement prints one JSON line: step (or batch) time, tokens/s, peak memory (the
device's `memory_stats` peak where the backend has one, else the process's peak RSS) and
MFU = the model's matmul FLOP rate / the device's bfloat16 matmul peak, measured in the
same run (a large jitted bfloat16 matmul). FLOPs: 2 x the decoder's non-embedding weights
per token + attention (4 x L x width per token and layer) + the LM head where it runs;
training = forward + input-gradient backward (the frozen LLM has no weight gradients),
about 2 forwards.

--peer runs the same work with transformers' PyTorch OPTForCausalLM in float16, built from
an OPTConfig with random init on the device, soft prompts through `inputs_embeds` (the
authors' way: full prompt forward, loss on the target tokens, `generate` with
`inputs_embeds`; the 20 candidates scored as 20 prompt+title rows), and prints the ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_common  # pylint: disable=wrong-import-position  (this folder is sys.path[0])

# OPT shapes (transformers' published configs).
MODELS = {
    "opt-6.7b": dict(vocab_size=50272, hidden_size=4096, ffn_dim=16384, num_layers=32,
                     num_heads=32, max_position_embeddings=2048),
    "opt-1.3b": dict(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_layers=24,
                     num_heads=32, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, ffn_dim=128, num_layers=2, num_heads=4,
                 max_position_embeddings=1024),
}
NUM_HISTORY, NUM_CANDIDATES = 10, 20       # the paper's prompt
CF_DIM, LATENT = 50, 128                   # SASRec width, stage-1 latent width
TEMPLATE_TOKENS = (12, 28, 6)              # words before the history, before the
                                           #   candidates, before the answer
EOS, PAD = 2, 1                            # OPT's </s>, <pad>


def _lengths(rng, n, mean):
  return np.clip(rng.poisson(mean, size=n), 2, 3 * mean).astype(np.int64)


def synth_prompts(rng, batch: int, vocab: int, title_tokens: int, bucket: int = 32) -> dict:
  """A training PromptBatch of the paper's shape (right padded; see the module docstring).

  Returns numpy arrays: input_ids, attention_mask int32[B, L]; user_pos int32[B, 1];
  item_pos, item_ids int32[B, 30]; target_pos, target_ids int32[B, Tt]; target_mask
  float32[B, Tt]; prompt_len int32[B] (the prompt without its answer).
  """
  words = lambda n: list(rng.integers(4, vocab, size=n))
  rows, slots, targets, plens = [], [], [], []
  for _ in range(batch):
    ids, slot = [EOS, PAD], []                 # </s>, [U]
    ids += words(TEMPLATE_TOKENS[0])
    for k in range(NUM_HISTORY + NUM_CANDIDATES):
      if k == NUM_HISTORY:
        ids += words(TEMPLATE_TOKENS[1])
      ids += words(int(_lengths(rng, 1, title_tokens)[0]) + 1)   # `,"title"`
      slot.append(len(ids))
      ids.append(PAD)                          # the item's soft token
    ids += words(TEMPLATE_TOKENS[2])
    plens.append(len(ids))
    target = words(int(_lengths(rng, 1, title_tokens)[0]) + 1) + [EOS]
    targets.append((len(ids), target))
    ids += target
    rows.append(ids)
    slots.append(slot)
  length = -(-max(len(r) for r in rows) // bucket) * bucket
  tt = max(len(t) for _, t in targets)
  out = {"input_ids": np.full((batch, length), PAD, np.int32),
         "attention_mask": np.zeros((batch, length), np.int32),
         "user_pos": np.ones((batch, 1), np.int32),
         "item_pos": np.asarray(slots, np.int32),
         "item_ids": rng.integers(1, 1000, size=(batch, len(slots[0]))).astype(np.int32),
         "target_pos": np.full((batch, tt), length - 1, np.int32),
         "target_ids": np.zeros((batch, tt), np.int32),
         "target_mask": np.zeros((batch, tt), np.float32),
         "prompt_len": np.asarray(plens, np.int32),
         "user_rep": rng.normal(size=(batch, CF_DIM)).astype(np.float32)}
  for b, (r, (start, t)) in enumerate(zip(rows, targets)):
    out["input_ids"][b, :len(r)] = r
    out["attention_mask"][b, :len(r)] = 1
    n = len(t)
    out["target_pos"][b, :n] = np.arange(start - 1, start - 1 + n)   # logits that predict t
    out["target_ids"][b, :n] = t
    out["target_mask"][b, :n] = 1
  return out


def forward_flops(cfg, tokens: int, seq_len: int, head_rows: int = 0) -> float:
  """Matmul FLOPs of an OPT forward over `tokens` tokens in sequences of `seq_len`, with
  the LM head on `head_rows` rows."""
  e, f, n = cfg.hidden_size, cfg.ffn_dim, cfg.num_layers
  per_token = 2 * n * (4 * e * e + 2 * e * f) + 4 * n * seq_len * e
  if cfg.has_projections:
    per_token += 2 * 2 * e * cfg.embed_dim
  return float(per_token * tokens + 2 * cfg.embed_dim * cfg.vocab_size * head_rows)


def peak_memory_bytes() -> tuple[int, str]:
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_rss"


def matmul_peak_flops(n: int, runs: int = 10) -> float:
  """FLOP/s of a jitted bfloat16 [n, n] x [n, n] matmul (float32 accumulation) on the
  default device: the device's measured bfloat16 matmul peak."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  ts = []
  for _ in range(runs):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(ts)


def make_llm(name: str, seed: int):
  """(module, params) of a random bfloat16 OPT created on the device (one-device mesh)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from allmrec_jax import sharding  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models.llm import OPTConfig, OPTDecoder  # pylint: disable=import-outside-toplevel
  cfg = OPTConfig(**MODELS[name], dtype="bfloat16", param_dtype="bfloat16",
                  bos_token_id=EOS, eos_token_ids=(EOS,), pad_token_id=PAD)
  module = OPTDecoder(cfg)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.axis_rules(None)
  ids = jnp.zeros((1, 8), jnp.int32)
  init = lambda key: module.init(key, input_ids=ids)["params"]
  abstract = jax.eval_shape(init, jax.random.PRNGKey(seed))
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
  params = nn.meta.unbox(params)
  jax.block_until_ready(params)
  return cfg, module, params


def _time(fn, warmup: int, iters: int) -> list[float]:
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return ts


def bench_train(args, cfg, module, params, batch: int, peak: float) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models import projectors as proj_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models import soft_prompt  # pylint: disable=import-outside-toplevel
  proj = proj_lib.Stage2Projectors(LATENT, CF_DIM, cfg.embed_dim)
  pp = proj.init(jax.random.PRNGKey(1), jnp.zeros((1, LATENT)), jnp.zeros((1, CF_DIM)))
  table = jax.random.uniform(jax.random.PRNGKey(2), (1001, LATENT))
  opt = optax.adam(1e-4, b1=0.9, b2=0.98)
  state = (pp, opt.init(pp))
  llm_vars = {"params": params}

  def loss_fn(pp, batch):
    embeds = soft_prompt.soft_prompt_embeds(module, llm_vars, proj, pp, table, batch)
    _, aux = module.apply(llm_vars, inputs_embeds=embeds,
                          attention_mask=batch["attention_mask"], compute_logits=False)
    h = jnp.take_along_axis(aux["hidden"], batch["target_pos"][..., None], axis=1)
    logits = module.apply(llm_vars, h, method=module.logits).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_ids"])
    return jnp.sum(ce * batch["target_mask"]) / jnp.maximum(batch["target_mask"].sum(), 1)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, batch):
    pp, os_ = state
    loss, g = jax.value_and_grad(loss_fn)(pp, batch)
    upd, os_ = opt.update(g, os_, pp)
    return (optax.apply_updates(pp, upd), os_), loss

  rng = np.random.default_rng(args.seed)
  host = synth_prompts(rng, batch, cfg.vocab_size, args.title_tokens)
  data = {k: jnp.asarray(v) for k, v in host.items() if k != "prompt_len"}
  box = [state]

  def run():
    box[0], loss = step(box[0], data)
    float(loss)
  ts = _time(run, args.warmup, args.iters)
  med = statistics.median(ts)
  b, length = host["input_ids"].shape
  nonpad = int(host["attention_mask"].sum())
  tt = host["target_ids"].shape[1]
  flops = 2 * forward_flops(cfg, b * length, length) + 3 * forward_flops(cfg, 0, 0, b * tt)
  mem, where = peak_memory_bytes()
  return {"measure": "train_step", "side": "jax", "model": args.model, "dtype": "bfloat16",
          "batch": batch, "seq_len": length, "nonpad_tokens": nonpad,
          "step_s": med, "step_s_min": min(ts), "tokens_per_s": nonpad / med,
          "padded_tokens_per_s": b * length / med, "tflop_per_s": flops / med / 1e12,
          "mfu": flops / med / peak, "peak_memory_bytes": mem, "peak_memory_source": where}


def bench_eval(args, cfg, module, params, peak: float) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from allmrec_jax import generate as gen_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax import scoring  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models import projectors as proj_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.models import soft_prompt  # pylint: disable=import-outside-toplevel
  bs = args.eval_batch
  rng = np.random.default_rng(args.seed + 1)
  host = synth_prompts(rng, bs, cfg.vocab_size, args.title_tokens)
  # The prompt without its answer, left padded (how the evaluator runs it).
  p = int(-(-host["prompt_len"].max() // 32) * 32)
  ids = np.full((bs, p), PAD, np.int32)
  mask = np.zeros((bs, p), np.int32)
  shift = p - host["prompt_len"]
  for b in range(bs):
    n = host["prompt_len"][b]
    ids[b, p - n:] = host["input_ids"][b, :n]
    mask[b, p - n:] = 1
  batch = {"input_ids": ids, "user_pos": host["user_pos"] + shift[:, None],
           "item_pos": host["item_pos"] + shift[:, None], "item_ids": host["item_ids"],
           "user_rep": host["user_rep"]}
  t_len = args.title_tokens + 8
  cont = rng.integers(4, cfg.vocab_size, size=(bs, NUM_CANDIDATES, t_len)).astype(np.int32)
  cmask = (np.arange(t_len)[None, None] < _lengths(rng, bs * NUM_CANDIDATES,
                                                   args.title_tokens + 2).reshape(
                                                       bs, NUM_CANDIDATES, 1)).astype(np.int32)
  packed = scoring.packed_length(cmask)
  proj = proj_lib.Stage2Projectors(LATENT, CF_DIM, cfg.embed_dim)
  pp = proj.init(jax.random.PRNGKey(1), jnp.zeros((1, LATENT)), jnp.zeros((1, CF_DIM)))
  table = jax.random.uniform(jax.random.PRNGKey(2), (1001, LATENT))
  llm_vars = {"params": params}
  eos, options = gen_lib.generation_options(None, repetition_penalty=1.5)

  @jax.jit
  def evaluate(batch, mask, cont, cmask):
    embeds = soft_prompt.soft_prompt_embeds(module, llm_vars, proj, pp, table, batch)
    logp, _, out = scoring.rank_and_generate_fn(
        module, llm_vars, None, embeds, mask, cont, cmask, eos, options,
        jax.random.PRNGKey(0), max_new_tokens=args.new_tokens, pad_id=PAD,
        packed_len=packed)
    return jnp.argsort(-logp, axis=1), out.tokens

  args_dev = (jax.tree.map(jnp.asarray, batch), jnp.asarray(mask), jnp.asarray(cont),
              jnp.asarray(cmask))
  ts = _time(lambda: jax.block_until_ready(evaluate(*args_dev)), 1, args.eval_iters)
  med = statistics.median(ts)
  n = args.new_tokens
  flops = (forward_flops(cfg, bs * p, p, bs) + forward_flops(cfg, bs * packed, p + packed,
                                                              bs * packed)
           + forward_flops(cfg, bs * n, p + n, bs * n))
  mem, where = peak_memory_bytes()
  return {"measure": "evaluation", "side": "jax", "model": args.model, "dtype": "bfloat16",
          "batch": bs, "prompt_len": p, "candidates": NUM_CANDIDATES, "new_tokens": n,
          "step_s": med, "s_per_user": med / bs, "users_per_s": bs / med,
          "tokens_per_s": (int(mask.sum()) + int(cmask.sum()) + bs * n) / med,
          "tflop_per_s": flops / med / 1e12, "mfu": flops / med / peak,
          "peak_memory_bytes": mem, "peak_memory_source": where}


# ---------------------------------------------------------------------------------------
# The PyTorch peer: the authors' way (transformers OPT in float16, `inputs_embeds`).


def _torch_peer(args, batches: list[int], shape: dict, peak: float) -> list[dict]:
  """The same measurements with transformers' OPTForCausalLM (float16 on a GPU; float32
  on a CPU, where PyTorch's float16 kernels are missing or slow), random init on the
  device: full-prompt forward with the full LM head, loss on the target tokens, Adam on
  the projectors; evaluation = the 20 candidates as 20 prompt+title rows per user (no
  cache sharing) and `generate(inputs_embeds=...)` of --new_tokens tokens."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  dtype = torch.float16 if dev.type == "cuda" else torch.float32
  hf = transformers.OPTConfig(
      vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
      ffn_dim=shape["ffn_dim"], num_hidden_layers=shape["num_layers"],
      num_attention_heads=shape["num_heads"],
      max_position_embeddings=shape["max_position_embeddings"],
      word_embed_proj_dim=shape["hidden_size"], bos_token_id=EOS, eos_token_id=EOS,
      pad_token_id=PAD)
  torch.manual_seed(args.seed)
  default = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with dev:
      model = transformers.OPTForCausalLM(hf).eval()
  finally:
    torch.set_default_dtype(default)
  for q in model.parameters():
    q.requires_grad_(False)
  e = hf.word_embed_proj_dim

  def projector(d_in, act):
    return nn.Sequential(nn.Linear(d_in, e), nn.LayerNorm(e), act, nn.Linear(e, e)).to(dev)
  item_proj, user_proj = projector(LATENT, nn.GELU()), projector(CF_DIM, nn.LeakyReLU())
  table = torch.rand(1001, LATENT, device=dev)
  opt = torch.optim.Adam([*item_proj.parameters(), *user_proj.parameters()], lr=1e-4,
                         betas=(0.9, 0.98))
  emb = model.get_input_embeddings()

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()

  def memory():
    if dev.type == "cuda":
      return int(torch.cuda.max_memory_allocated()), "device"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_rss"

  def embeds_of(t):
    x = emb(t["input_ids"]).clone()
    rows = torch.arange(x.shape[0], device=dev)[:, None]
    x[rows, t["item_pos"]] = item_proj(table[t["item_ids"]]).to(x.dtype)
    x[rows, t["user_pos"]] = user_proj(t["user_rep"])[:, None].to(x.dtype)
    return x

  cfg_like = type("C", (), dict(hidden_size=hf.hidden_size, ffn_dim=hf.ffn_dim,
                                num_layers=hf.num_hidden_layers, has_projections=False,
                                embed_dim=e, vocab_size=hf.vocab_size))
  out = []
  for b in batches:
    try:
      if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
      host = synth_prompts(np.random.default_rng(args.seed), b, hf.vocab_size,
                           args.title_tokens)
      t = {k: torch.as_tensor(v, device=dev).long() if v.dtype.kind == "i" else
           torch.as_tensor(v, device=dev) for k, v in host.items()}

      def step(t=t, b=b):
        opt.zero_grad()
        logits = model(inputs_embeds=embeds_of(t), attention_mask=t["attention_mask"]).logits
        rows = torch.arange(b, device=dev)[:, None]
        lg = logits[rows, t["target_pos"]].float()
        ce = nn.functional.cross_entropy(lg.flatten(0, 1), t["target_ids"].flatten(),
                                         reduction="none").view(b, -1)
        loss = (ce * t["target_mask"]).sum() / t["target_mask"].sum()
        loss.backward()
        opt.step()
        sync()
        return float(loss.detach())
      ts = _time(step, args.warmup, args.iters)
      med = statistics.median(ts)
      length = host["input_ids"].shape[1]
      nonpad = int(host["attention_mask"].sum())
      flops = 2 * forward_flops(cfg_like, b * length, length, b * length)
      mem, where = memory()
      out.append({"measure": "train_step", "side": "torch", "model": args.model,
                  "dtype": str(dtype).replace("torch.", ""), "batch": b, "seq_len": length,
                  "step_s": med, "tokens_per_s": nonpad / med,
                  "tflop_per_s": flops / med / 1e12, "mfu": flops / med / peak,
                  "peak_memory_bytes": mem, "peak_memory_source": where})
    except Exception as ex:  # pylint: disable=broad-except   (out of memory at a batch)
      out.append({"measure": "train_step", "side": "torch", "batch": b,
                  "error": f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}"})
      if dev.type == "cuda":
        torch.cuda.empty_cache()
  # Evaluation: per user, 20 prompt+title rows scored, then generation of the batch.
  bs, n = args.eval_batch, args.new_tokens
  host = synth_prompts(np.random.default_rng(args.seed + 1), bs, hf.vocab_size,
                       args.title_tokens)
  rng = np.random.default_rng(args.seed + 2)
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()

  @torch.no_grad()
  def evaluate():
    p = int(host["prompt_len"].max())
    t = {k: torch.as_tensor(v[:, :p], device=dev).long() for k, v in host.items()
         if k in ("input_ids", "attention_mask")}
    t.update({k: torch.as_tensor(host[k], device=dev).long()
              for k in ("user_pos", "item_pos", "item_ids")})
    t["user_rep"] = torch.as_tensor(host["user_rep"], device=dev)
    x = embeds_of(t)
    for u in range(bs):
      pl = int(host["prompt_len"][u])
      titles = rng.integers(4, hf.vocab_size, size=(NUM_CANDIDATES, args.title_tokens + 2))
      cand = emb(torch.as_tensor(titles, device=dev))
      rows = torch.cat([x[u:u + 1, :pl].expand(NUM_CANDIDATES, -1, -1), cand], 1)
      logits = model(inputs_embeds=rows).logits[:, pl - 1:-1].float()
      logits.log_softmax(-1).gather(-1, torch.as_tensor(titles, device=dev)[..., None])
    model.generate(inputs_embeds=x, attention_mask=t["attention_mask"], max_new_tokens=n,
                   min_new_tokens=n, do_sample=False, repetition_penalty=1.5,
                   pad_token_id=PAD)
    sync()
  ts = _time(evaluate, 1, args.eval_iters)
  med = statistics.median(ts)
  p = int(host["prompt_len"].mean())
  c_rows = bs * NUM_CANDIDATES
  c_len = p + args.title_tokens + 2
  flops = (forward_flops(cfg_like, c_rows * c_len, c_len, c_rows * c_len)
           + forward_flops(cfg_like, bs * p, p, bs) + forward_flops(cfg_like, bs * n, p + n,
                                                                     bs * n))
  mem, where = memory()
  out.append({"measure": "evaluation", "side": "torch", "model": args.model,
              "dtype": str(dtype).replace("torch.", ""), "batch": bs, "new_tokens": n,
              "step_s": med, "s_per_user": med / bs, "users_per_s": bs / med,
              "tflop_per_s": flops / med / 1e12, "mfu": flops / med / peak,
              "peak_memory_bytes": mem, "peak_memory_source": where})
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="opt-6.7b", help=f"one of {', '.join(MODELS)}")
  ap.add_argument("--batches", default="4,16,32", help="training batches (comma list)")
  ap.add_argument("--eval_batch", type=int, default=8, help="users per evaluation batch")
  ap.add_argument("--new_tokens", type=int, default=64, help="greedy tokens per user")
  ap.add_argument("--title_tokens", type=int, default=10, help="mean tokens per title")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--eval_iters", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--peer", action="store_true", help="also run the PyTorch float16 way")
  ap.add_argument("--peak_n", type=int, default=0,
                  help="matmul size of the peak measurement (0 = 8192, 512 for tiny)")
  args = ap.parse_args(argv)
  if args.model not in MODELS:
    ap.error(f"--model={args.model!r}: expected one of {', '.join(MODELS)}")
  try:
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
  except ValueError:
    ap.error(f"--batches={args.batches!r}: expected a comma list of integers")
  if not batches or min(batches) < 1:
    ap.error(f"--batches={args.batches!r}: expected positive integers")
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  peak = matmul_peak_flops(args.peak_n or (512 if args.model == "tiny" else 8192))
  print(json.dumps({"measure": "device", "device": str(dev.device_kind),
                    "platform": dev.platform, "bf16_matmul_peak_tflop_s": peak / 1e12,
                    "loadavg": bench_common.loadavg()}), flush=True)
  t = time.perf_counter()
  cfg, module, params = make_llm(args.model, args.seed)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(json.dumps({"measure": "init", "model": args.model, "params": n_params,
                    "init_s": time.perf_counter() - t}), flush=True)
  ours = {}
  for b in batches:
    try:
      ours[b] = bench_train(args, cfg, module, params, b, peak)
    except Exception as e:  # pylint: disable=broad-except   (out of memory at a batch)
      ours[b] = {"measure": "train_step", "side": "jax", "batch": b,
                 "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    print(json.dumps(ours[b]), flush=True)
  ev = bench_eval(args, cfg, module, params, peak)
  print(json.dumps(ev), flush=True)
  if args.peer:
    del params, module
    jax.clear_caches()
    for rec in _torch_peer(args, batches, MODELS[args.model], peak):
      ref = ours.get(rec.get("batch")) if rec["measure"] == "train_step" else ev
      if ref and "step_s" in ref and "step_s" in rec:
        rec["jax_speedup"] = rec["step_s"] / ref["step_s"]
      print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
