"""LLM decoders: registry of families (transformers `model_type` -> module + config)."""

from __future__ import annotations

import dataclasses

from allmrec_jax.models.llm.llama import LlamaConfig, LlamaDecoder, init_cache
from allmrec_jax.models.llm.opt import OPTConfig, OPTDecoder


@dataclasses.dataclass(frozen=True)
class LLMFamily:
  name: str
  module: type          # flax.linen decoder class
  config: type          # its frozen config dataclass (has .from_hf)


LLM_FAMILIES: dict[str, LLMFamily] = {
    "llama": LLMFamily("llama", LlamaDecoder, LlamaConfig),
    "opt": LLMFamily("opt", OPTDecoder, OPTConfig),
    "mistral": LLMFamily("llama", LlamaDecoder, LlamaConfig),   # + sliding window
    "qwen2": LLMFamily("llama", LlamaDecoder, LlamaConfig),     # + q/k/v biases
}


def family_of(model_type: str) -> LLMFamily:
  """The family for a transformers `model_type`; a clear error for unknown ones."""
  if model_type not in LLM_FAMILIES:
    raise ValueError(f"unsupported LLM architecture model_type={model_type!r} "
                     f"(supported: {', '.join(sorted(LLM_FAMILIES))})")
  return LLM_FAMILIES[model_type]


def make_decoder(config):
  """The decoder module for a LlamaConfig / OPTConfig."""
  return LLM_FAMILIES[config.family].module(config)


__all__ = ["LLM_FAMILIES", "LLMFamily", "LlamaConfig", "LlamaDecoder", "OPTConfig",
           "OPTDecoder", "family_of", "init_cache", "make_decoder"]
