r"""Generates continuations of prompts with a Flax decoder and its KV cache.

Run:
  python launch/generate.py --llm=smollm2-135m --prompt="The capital of France is" \
      --max_new_tokens=16
  python launch/generate.py --llm=/models/opt-6.7b --dtype=bfloat16 --batch=prompts.txt \
      --repetition_penalty=1.5
  python launch/generate.py --llm=/models/model.Q4_1.gguf --prompt="Hi" --temperature=0.7 \
      --top_p=0.9 --seed=1

`--llm` takes "smollm2-135m" (the embedded SmolLM2-135M-Instruct), a Hugging Face model
directory, or a .gguf file. One prompt prints its continuation; `--batch` (a file with one
prompt per line) prints one JSON line {"prompt", "continuation"} per prompt.
"""

from __future__ import annotations

import json
import pathlib

from absl import app
from absl import flags
from absl import logging

import launch
from allmrec_jax import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_string("llm", "smollm2-135m",
                    "smollm2-135m | a Hugging Face model directory | a .gguf file")
flags.DEFINE_string("prompt", None, "the prompt (or use --batch)")
flags.DEFINE_string("batch", None, "a text file with one prompt per line")
flags.DEFINE_integer("max_new_tokens", 16, "tokens to generate at most")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute / parameter dtype")
flags.DEFINE_enum("matmul_dtype", "", ["", "bfloat16"],
                  "'' = matmuls in --dtype; bfloat16 = matmul operands in bfloat16 with "
                  "float32 accumulation (faster on CPUs with AVX512-BF16)")
flags.DEFINE_float("repetition_penalty", 1.0, "transformers' repetition penalty (paper: 1.5)")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 = sampling temperature")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling threshold (with --temperature > 0)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_bool("chat", False, "wrap each prompt in the tokenizer's chat template as a "
                  "user turn")


def read_prompts() -> list[str]:
  """The prompts from --prompt or --batch, with one-line errors naming the flag/file."""
  if (FLAGS.prompt is None) == (FLAGS.batch is None):
    raise app.UsageError("pass exactly one of --prompt and --batch")
  if FLAGS.prompt is not None:
    if not FLAGS.prompt:
      raise app.UsageError("--prompt is empty")
    return [FLAGS.prompt]
  path = pathlib.Path(FLAGS.batch).expanduser()
  if not path.is_file():
    raise app.UsageError(f"--batch={path}: no such file")
  prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
  prompts = [p for p in prompts if p.strip()]
  if not prompts:
    raise app.UsageError(f"--batch={path}: no prompts (one per line expected)")
  return prompts


def main(argv):
  del argv
  host_memory.reexec_with_huge_pages()   # first: it restarts the process once
  if FLAGS.max_new_tokens < 1:
    raise app.UsageError(f"--max_new_tokens={FLAGS.max_new_tokens}: must be >= 1")
  if FLAGS.temperature < 0:
    raise app.UsageError(f"--temperature={FLAGS.temperature}: must be >= 0")
  if not 0.0 < FLAGS.top_p <= 1.0:
    raise app.UsageError(f"--top_p={FLAGS.top_p}: must be in (0, 1]")
  if FLAGS.repetition_penalty <= 0:
    raise app.UsageError(f"--repetition_penalty={FLAGS.repetition_penalty}: must be > 0")
  prompts = read_prompts()

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from allmrec_jax import generate as gen  # pylint: disable=import-outside-toplevel
  from allmrec_jax.weights import llm as llm_weights  # pylint: disable=import-outside-toplevel

  loaded = llm_weights.load_llm(FLAGS.llm, dtype=FLAGS.dtype, matmul_dtype=FLAGS.matmul_dtype)
  tok = loaded.tokenizer
  if FLAGS.chat:
    prompts_in = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]
  else:
    prompts_in = prompts
  enc = tok(prompts_in, padding=True, padding_side="left", return_tensors="np")
  ids = enc["input_ids"].astype(np.int32)
  mask = enc["attention_mask"].astype(np.int32)
  eos = list(loaded.config.eos_token_ids) or ([tok.eos_token_id]
                                              if tok.eos_token_id is not None else [])
  pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
  logging.info("generating %d prompt(s), prompt length %d, eos=%s", len(prompts),
               ids.shape[1], eos)
  out = gen.generate(loaded.module, loaded.params, input_ids=ids, attention_mask=mask,
                     max_new_tokens=FLAGS.max_new_tokens, eos_id=eos or None, pad_id=pad,
                     temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                     repetition_penalty=FLAGS.repetition_penalty,
                     rng=jax.random.PRNGKey(FLAGS.seed))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  texts = [tok.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
           for i in range(len(prompts))]
  if FLAGS.batch is None:
    print(texts[0])
  else:
    for p, t in zip(prompts, texts):
      print(json.dumps({"prompt": p, "continuation": t}, ensure_ascii=False))


def run():
  """The `allmrec-generate` console script."""
  launch.run(main, __name__)


if __name__ == "__main__":
  app.run(main)
