"""Rotary position embeddings (RoPE) with the rope-scaling kinds of Llama-family checkpoints.

Frequencies follow transformers' `ROPE_INIT_FUNCTIONS` for the kinds "default", "linear",
"dynamic" (NTK, recomputed from the largest position of the call) and "llama3". The rotation
is the "rotate half" layout of Hugging Face checkpoints (GGUF weights are un-permuted into it
by the loader).
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from allmrec_jax import common_types as ct

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
  """float32[dim // 2]: theta^(-2i/dim).

  Rounded like transformers (f32 exponent, power rounded to f32, then an f32 reciprocal):
  a 1-ulp difference in a frequency shifts angles by ~position x 6e-8 and measurably moves
  the logits of deep models with large activations.
  """
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
  return (np.float32(1.0) / power).astype(np.float32)


def static_inv_freq(theta: float, dim: int, scaling: Mapping[str, Any] | None) -> np.ndarray:
  """Inverse frequencies float32[dim // 2] for the position-independent rope kinds.

  Args:
    theta: rope base.
    dim: rotary dimension (head_dim).
    scaling: None, or a dict with "rope_type" in SUPPORTED_ROPE_TYPES and its parameters
      ("factor"; llama3: "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"). "dynamic" returns the unscaled base frequencies.
  """
  inv = base_inv_freq(theta, dim)
  kind = (scaling or {}).get("rope_type", "default")
  if kind in ("default", "dynamic"):
    return inv
  if kind == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out).astype(np.float32)
  raise ValueError(f"rope_scaling.rope_type={kind!r} is not supported "
                   f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def dynamic_inv_freq(theta: float, dim: int, factor: float, max_positions: int,
                     seq_len: ct.Array) -> ct.Array:
  """NTK "dynamic" frequencies for a (traced) sequence length, as transformers recomputes them.

  seq_len below max_positions gives the unscaled frequencies.
  """
  seq_len = jnp.maximum(seq_len.astype(jnp.float32), float(max_positions))
  base = theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
  exponent = jnp.asarray(np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
  return 1.0 / (base ** exponent)


def rotary_cos_sin(positions: ct.Array, inv_freq: ct.Array) -> tuple[ct.Array, ct.Array]:
  """cos, sin float32[B, T, D] for int positions [B, T] (frequencies repeated twice)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: ct.Array, cos: ct.Array, sin: ct.Array) -> ct.Array:
  """Rotates x float[B, T, H, D] by cos/sin float[B, T, D] ("rotate half" layout)."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
