"""Dense layers whose parameters carry logical axis names."""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from allmrec_jax import common_types as ct

default_kernel_init = nn.initializers.normal(stddev=0.02)


def cpu_has_bf16_matmul() -> bool:
  """True when this host's CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = f.read()
  except OSError:
    return False
  return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_matmul_dtype(matmul_dtype: str | None) -> str:
  """The matmul operand dtype a `*.matmul_dtype` setting means on this host: "auto" =
  "bfloat16" on an accelerator or a CPU with native bfloat16 matmuls, else "" (the
  compute dtype: on an AVX2-only CPU bfloat16 operands are slower than float32)."""
  if matmul_dtype != "auto":
    return matmul_dtype or ""
  if jax.default_backend() != "cpu" or cpu_has_bf16_matmul():
    return "bfloat16"
  return ""


def is_low_precision(matmul_dtype, dtype) -> bool:
  """True when `matmul_dtype` is set and differs from the compute `dtype`."""
  return bool(matmul_dtype) and jnp.dtype(matmul_dtype) != jnp.dtype(dtype)


class DenseGeneral(nn.Module):
  """y = x . kernel (+ bias), contracting the last `num_contract` axes of x.

  Attributes:
    features: output feature shape, e.g. (H, Dh) for a query projection.
    kernel_axes: logical names of the kernel, one per contracted + output axis.
    num_contract: how many trailing input axes are contracted.
    use_bias: add a bias of shape `features`.
    dtype: compute dtype; param_dtype: parameter dtype.
    matmul_dtype: None = matmul in `dtype`; e.g. bfloat16 = operands rounded to it with
      float32 accumulation (`low_precision_dense`), the result cast to `dtype`.
    lora_rank: > 0 makes the layer an adapter target: y += (alpha / rank) * (x . A) . B with
      A [*in, rank] and B [rank, *features] in the "lora" collection (Hu et al. 2021; A
      uniform in +-1/sqrt(fan_in), B zero, so a fresh adapter leaves y unchanged). The
      adapter runs only when that collection is passed (or is being created: applied with
      mutable=["lora"]); without it the layer is the plain frozen projection.
    lora_alpha: the alpha of that scale.
  """
  features: Sequence[int]
  kernel_axes: Sequence[str | None]
  num_contract: int = 1
  use_bias: bool = False
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32
  kernel_init: nn.initializers.Initializer = default_kernel_init
  matmul_dtype: ct.DType | None = None
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: ct.Array) -> ct.Array:
    """float[..., *in] -> float[..., *features]."""
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.num_contract:]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
                        in_shape + features, self.param_dtype)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if is_low_precision(self.matmul_dtype, self.dtype):
      lead = x.shape[:x.ndim - self.num_contract]
      y = low_precision_dense(jnp.dtype(self.matmul_dtype))(
          x.reshape(lead + (math.prod(in_shape),)),
          kernel.reshape(math.prod(in_shape), math.prod(features)))
      y = y.reshape(lead + features).astype(self.dtype)
    else:
      contract_x = tuple(range(x.ndim - self.num_contract, x.ndim))
      contract_k = tuple(range(self.num_contract))
      y = lax.dot_general(x, kernel, ((contract_x, contract_k), ((), ())))
    if self.use_bias:
      bias_axes = tuple(self.kernel_axes)[self.num_contract:]
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                        features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank and (self.is_mutable_collection("lora") or self.has_variable("lora", "a")):
      y = y + self._lora_delta(x, in_shape, features)
    return y

  def _lora_delta(self, x: ct.Array, in_shape: tuple[int, ...],
                  features: tuple[int, ...]) -> ct.Array:
    """(alpha / rank) * (x . A) . B in `dtype` (the adapter matmuls are rank-thin), with
    `matmul_dtype` operands when the layer's own matmul takes them."""
    r, nc = self.lora_rank, self.num_contract
    axes = tuple(self.kernel_axes)
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                              in_axis=tuple(range(nc)), out_axis=-1)
    a = self.variable("lora", "a", lambda: nn.LogicallyPartitioned(
        a_init(self.make_rng("params"), in_shape + (r,), self.param_dtype),
        names=axes[:nc] + (None,))).value
    b = self.variable("lora", "b", lambda: nn.LogicallyPartitioned(
        jnp.zeros((r,) + features, self.param_dtype), names=(None,) + axes[nc:])).value
    if is_low_precision(self.matmul_dtype, self.dtype):
      # The same operand rounding as the frozen projection beside it: on a 2-core
      # AVX512-BF16 CPU the stage-2 step with q/k/v/o adapters 2.40 -> 2.26 s.
      lead = x.shape[:x.ndim - nc]
      mm = low_precision_dense(jnp.dtype(self.matmul_dtype))
      h = mm(x.reshape(lead + (math.prod(in_shape),)), a.reshape(math.prod(in_shape), r))
      y = mm(h, b.reshape(r, math.prod(features))).reshape(lead + features).astype(self.dtype)
    else:
      contract_x = tuple(range(x.ndim - nc, x.ndim))
      h = lax.dot_general(x, a.astype(self.dtype), ((contract_x, tuple(range(nc))), ((), ())))
      y = lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return (self.lora_alpha / r) * y


class Embed(nn.Module):
  """Token embedding table float[V, E] with lookup and tied-head projection.

  Attributes:
    num_embeddings: V.
    features: E.
    dtype: compute dtype; param_dtype: parameter dtype.
    matmul_dtype: operand dtype of the tied-head matmul in `attend` (None = dtype).
  """
  num_embeddings: int
  features: int
  dtype: ct.DType = jnp.float32
  param_dtype: ct.DType = jnp.float32
  matmul_dtype: ct.DType | None = None

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(default_kernel_init, (ct.VOCAB, ct.EMBED)),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: ct.Array) -> ct.Array:
    """int[...] -> float[..., E]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: ct.Array) -> ct.Array:
    """float[..., E] -> float32[..., V] (x . embedding^T, the tied LM head)."""
    if is_low_precision(self.matmul_dtype, self.dtype):
      return low_precision_dense(jnp.dtype(self.matmul_dtype))(x, self.embedding.T)
    return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)


def activation(name: str):
  """The transformers activation names used by our decoders."""
  table = {"silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
           "gelu": lambda x: jax.nn.gelu(x, approximate=False),
           "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
           "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
  if name not in table:
    raise ValueError(f"activation {name!r} is not supported (supported: {sorted(table)})")
  return table[name]


@functools.cache
def low_precision_dense(operand_dtype, weight_grad_dtype=None):
  """f(x float[..., K], w float[K, N]) -> float32[..., N]: x . w with operands rounded to
  `operand_dtype` and float32 accumulation, in the forward pass and for the input gradient;
  the kernel gradient x^T . g from operands in `weight_grad_dtype` (None = operand_dtype).
  Cotangents come back in the dtypes of x and w (see `low_precision_dot_general`)."""
  low = jnp.dtype(operand_dtype)
  wgd = low if weight_grad_dtype is None else jnp.dtype(weight_grad_dtype)

  def _mm(a, b, dims):
    return lax.dot_general(a.astype(low), b.astype(low), dims,
                           preferred_element_type=jnp.float32)

  @jax.custom_vjp
  def dense_dot(x, w):
    return _mm(x, w, (((x.ndim - 1,), (0,)), ((), ())))

  def fwd(x, w):
    return dense_dot(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    dx = _mm(g, w, (((g.ndim - 1,), (1,)), ((), ())))             # g . w^T
    lead = tuple(range(x.ndim - 1))
    dw = lax.dot_general(x.astype(wgd), g.astype(wgd), ((lead, lead), ((), ())),
                         preferred_element_type=jnp.float32)       # x^T . g over all rows
    return dx.astype(x.dtype), dw.astype(w.dtype)

  dense_dot.defvjp(fwd, bwd)
  return dense_dot


def low_precision_dot_general(operand_dtype: ct.DType, weight_grad_dtype: ct.DType | None = None):
  """A `dot_general` for `nn.Dense(dot_general=...)`: the three matmuls of a dense layer
  (forward, input gradient, kernel gradient) take operands rounded to `operand_dtype`
  (e.g. bfloat16) and accumulate and return float32. `weight_grad_dtype` overrides the
  kernel gradient's operand dtype (None = `operand_dtype`). Inputs, kernel and cotangents
  keep their own dtype (float32 for a float32 model): only the matmul operands are rounded,
  as in mixed-precision training with float32 master weights.

  Why not `nn.Dense(dtype=bfloat16)`: XLA:CPU runs a bfloat16 x bfloat16 -> bfloat16 dot by
  upcasting to float32 (no gain), while bfloat16 operands with a float32 result use the
  CPU's bfloat16 dot-product instructions (~2x float32's rate on AVX512-BF16). Supports the
  dimension numbers `nn.Dense` uses (last axis of the input with the kernel's first axis).
  """
  dense_dot = low_precision_dense(jnp.dtype(operand_dtype),
                                  None if weight_grad_dtype is None else jnp.dtype(weight_grad_dtype))

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  **kwargs):
    del precision, preferred_element_type, kwargs
    (lc, rc), (lb, rb) = dimension_numbers
    if (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) != ((lhs.ndim - 1,), (0,), (), ()) or \
        rhs.ndim != 2:
      raise ValueError("low_precision_dot_general supports nn.Dense's contraction only, got "
                       f"dimension_numbers={dimension_numbers}")
    return dense_dot(lhs, rhs).astype(jnp.result_type(lhs.dtype, rhs.dtype))
  return dot_general
