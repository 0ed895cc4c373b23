"""The paper's Amazon-2018 settings (SPEC section 2) with OPT-6.7B from a local path.

Run (8 GPUs or a TPU slice; the LLM is sharded FSDP x tensor over the mesh):
  python launch/train.py \
    --config=configs/amazon.py:Movies_and_TV,/data/amazon2018,/models/opt-6.7b \
    --workdir=runs/movies

The argument is "Category,raw_data_dir,llm_path": Category is one of Movies_and_TV,
Video_Games, Beauty, Toys_and_Games ({Category}.json.gz + meta_{Category}.json.gz in
raw_data_dir); llm_path is a Hugging Face directory (config.json + safetensors / .bin) or a
.gguf file. Everything else is the paper's default (configs/base.py).
"""

from configs import base

# Per category: (min_count, rating_threshold) as in the paper's preprocessing.
_PREPROCESSING = {
    "Movies_and_TV": (5, 0.0),
    "Video_Games": (5, 0.0),
    "Beauty": (4, 3.0),
    "Toys_and_Games": (4, 3.0),
}


def get_config(arg: str = "Movies_and_TV,/data/amazon2018,/models/opt-6.7b"):
  parts = [p.strip() for p in arg.split(",")]
  if len(parts) != 3:
    raise ValueError(f"configs/amazon.py expects 'Category,raw_data_dir,llm_path', got {arg!r}")
  category, data_dir, llm_path = parts
  c = base.get_base_config()
  c.data.dataset = f"amazon2018:{data_dir}:{category}"
  c.data.min_count, c.data.rating_threshold = _PREPROCESSING.get(category, (5, 0.0))
  c.llm.path = llm_path
  c.llm.dtype = "bfloat16"        # accelerators; fp32 on CPU
  c.llm.remat = True              # rematerialise decoder layers in stage 2 (memory)
  c.mesh.shape = (1, -1, 1)       # FSDP over all devices; e.g. (1, 4, 2) adds tensor parallel
  c.eval.batch_size = 16
  return c
