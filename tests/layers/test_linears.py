"""layers/linears.py: the low-precision dot of nn.Dense (bfloat16 operands, float32 sums)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allmrec_jax.layers import linears


def _round(a):
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


def test_forward_and_gradients_are_float32_sums_of_rounded_operands():
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 5, 16))
  w = jax.random.normal(kw, (16, 8))
  g = jax.random.normal(kg, (3, 5, 8))
  dot = linears.low_precision_dot_general(jnp.bfloat16)
  f = lambda a, b: dot(a, b, (((2,), (0,)), ((), ())))
  y, vjp = jax.vjp(f, x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  xr, wr, gr = _round(x), _round(w), _round(g)
  np.testing.assert_allclose(y, np.einsum("bti,io->bto", xr, wr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, np.einsum("bto,io->bti", gr, wr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("bti,bto->io", xr, gr), rtol=1e-5, atol=1e-5)
  # ... and within bfloat16 rounding of the float32 results.
  y32, vjp32 = jax.vjp(lambda a, b: a @ b, x, w)
  for a, b in zip((y, dx, dw), (y32,) + vjp32(g)):
    np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * float(np.abs(b).max()))
  # A float32 kernel gradient on request.
  dot32w = linears.low_precision_dot_general(jnp.bfloat16, weight_grad_dtype=jnp.float32)
  _, vjp2 = jax.vjp(lambda a, b: dot32w(a, b, (((2,), (0,)), ((), ()))), x, w)
  np.testing.assert_allclose(vjp2(g)[1], vjp32(g)[1], rtol=1e-5, atol=1e-5)


def test_in_dense_and_bad_dimension_numbers():
  x = jax.random.normal(jax.random.key(1), (4, 6))
  dense = nn.Dense(3, dot_general=linears.low_precision_dot_general(jnp.bfloat16))
  params = dense.init(jax.random.key(2), x)
  assert params["params"]["kernel"].dtype == jnp.float32
  y = dense.apply(params, x)
  k, b = params["params"]["kernel"], params["params"]["bias"]
  np.testing.assert_allclose(y, _round(x) @ _round(k) + b, rtol=1e-5, atol=1e-6)
  dot = linears.low_precision_dot_general(jnp.bfloat16)
  with pytest.raises(ValueError, match="nn.Dense"):
    dot(x, x, (((0,), (0,)), ((), ())))


def test_dense_general_and_tied_head_matmul_dtype():
  """DenseGeneral(matmul_dtype=bfloat16) with two contracted axes and Embed.attend: float32
  results equal to float32 sums of bfloat16-rounded operands; gradients flow to x."""
  x = jax.random.normal(jax.random.key(3), (2, 5, 4, 6))
  layer = linears.DenseGeneral((7,), ("heads", "kv", "embed"), num_contract=2, use_bias=True,
                               matmul_dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(4), x)
  p = nn.unbox(variables["params"])
  p = {"kernel": p["kernel"], "bias": p["bias"] + 0.5}
  y = layer.apply({"params": p}, x)
  assert y.dtype == jnp.float32 and y.shape == (2, 5, 7)
  ref = np.einsum("bthd,hdo->bto", _round(x), _round(p["kernel"])) + np.asarray(p["bias"])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda v: jnp.sum(layer.apply({"params": p}, v) ** 2))(x)
  g32 = jax.grad(lambda v: jnp.sum(linears.DenseGeneral(
      (7,), ("heads", "kv", "embed"), num_contract=2, use_bias=True).apply(
          {"params": p}, v) ** 2))(x)
  np.testing.assert_allclose(g, g32, rtol=0, atol=0.05 * float(jnp.abs(g32).max()))

  emb = linears.Embed(11, 6, matmul_dtype=jnp.bfloat16)
  ev = emb.init(jax.random.key(5), jnp.zeros((1,), jnp.int32))
  h = jax.random.normal(jax.random.key(6), (3, 6))
  logits = emb.apply(ev, h, method="attend")
  table = np.asarray(nn.unbox(ev["params"])["embedding"])
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, _round(h) @ _round(table).T, rtol=1e-5, atol=1e-6)
