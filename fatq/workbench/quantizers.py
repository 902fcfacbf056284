"""Quantizers beside the uniform (FAT) one: power-of-two, fixed point, LSQ; and intrinsic fixed-point layers.

All are pure JAX functions; ``FakeQuant`` (fatq.layers) dispatches to :func:`apply_spec` when a rule's
``QuantSpec.kind`` is not ``'uniform'``, so every kind is usable in every layer rule (``conv1/kernel``,
``fc2/output``, ``input``, ...).

* **Power of two** (``kind='pot'``, bit-efficient-quantization.txt eq. 3): ``x_q = sign(x) * 2^round(log2|x|)``
  with an exponent budget. ``bits`` = 1 sign bit + ``bits - 1`` code bits; one code is zero, the other
  ``2^(bits-1) - 1`` codes are the exponents ``e_max - (2^(bits-1) - 2) .. e_max`` with
  ``e_max = round(log2 T_max)`` (``T_max`` = calibrated ``max|x|``, per tensor or per channel). Rounding is in the
  log domain, as in the paper: exponents above ``e_max`` saturate to ``e_max``; ``round(log2|x|) < e_min`` (and
  ``x = 0``) gives 0. 2 bits = ternary ``{-2^e_max, 0, 2^e_max}``. Straight-through gradient.
* **Fixed point** (``kind='fixed_point'``, TensorQuant): word width ``W = bits`` (two's complement), ``F`` fractional
  bits: ``x_q = clip(round(x * 2^F), -2^(W-1), 2^(W-1) - 1) * 2^-F`` (saturating). ``round`` is nearest (``floor(u +
  0.5)``, computed without rounding the sum; exact for W <= 24 in float32) or stochastic (``floor(u + U[0, 1))``,
  unbiased). Data-free: needs no statistics (but, as every quantizer, acts only once the model is calibrated: an
  uncalibrated FakeQuant passes its input through).
* **LSQ** (``kind='lsq'``, Esser et al. 2020, "Learned Step Size Quantization"):
  ``x_q = round(clip(x / s, -Q_n, Q_p)) * s`` with a learned step ``s`` (variable ``step`` in the ``quant``
  collection, so the FAT training loop trains it) whose gradient is multiplied by ``g = 1 / sqrt(N * Q_p)``
  (``N`` = number of weights of the tensor, or features per example of an activation). Signed tensors use
  ``Q_n = 2^(b-1), Q_p = 2^(b-1) - 1``, unsigned ones (calibrated min >= 0) ``Q_n = 0, Q_p = 2^b - 1``. Gradients
  (straight-through round): ``d x_q / d s = round(x/s) - x/s`` inside, ``-Q_n`` / ``Q_p`` outside; ``d x_q / d x``
  is 1 inside, 0 outside. The step starts at ``T_max / Q_p`` (the calibrated range: the same starting point as
  PTQ and FAT) rather than Esser's ``2 mean|x| / sqrt(Q_p)``, which needs per-tensor statistics the calibration
  pass does not record.

Intrinsic fixed point (``placement='intrinsic'`` on a layer's ``output`` rule): the dense / convolution layer is
computed as an explicit sequence of scalar operations (a convolution through its image patches), and *every
product* ``x_k * w_k``, *every partial sum* ``acc_k = Q(acc_{k-1} + p_k)`` (k in order over the kernel's input
elements: for a conv, channel-major ``(c, i, j)``, the order of ``lax.conv_general_dilated_patches``), and the bias
addition ``Q(acc + b)`` are quantized to the fixed-point grid. The activation (ReLU) of grid values stays on the
grid, and the ``output`` quantizer then quantizes the result once more (a no-op on grid values except saturation).
Inputs and weights are not quantized unless their own rules say so. Extrinsic placement quantizes only the layer
output (the ``output`` point's ordinary fake quant). With nearest rounding, the sum of two grid values is on the
grid, so partial sums differ from the float sum only by saturation; products are rounded.

Stochastic rounding draws its noise from the ``'quantize'`` RNG stream when the model is applied with
``rngs={'quantize': key}``; without one the key is derived from the tensor's bits (deterministic for a given input,
different for different inputs).
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from jax import lax

from fatq.quantizers import bounded

# ---------------------------------------------------------------------------------------------------------------------
# Power of two.


def pot_exponent_range(t_max: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """``(e_min, e_max)`` of the exponent budget: ``2^(bits-1) - 1`` consecutive exponents ending at round(log2 T_max)."""
  if not 2 <= bits <= 16:
    raise ValueError(f"power-of-two bits must be in 2..16, got {bits}")
  e_max = jnp.round(jnp.log2(jnp.maximum(t_max, 1e-30)))
  return e_max - (2 ** (bits - 1) - 2), e_max


def pot(x: jax.Array, bits: int, t_max: jax.Array) -> jax.Array:
  """Power-of-two quantization of ``x`` (see the module docstring), straight-through gradient."""
  e_min, e_max = pot_exponent_range(t_max, bits)
  ax = jnp.abs(x)
  e = jnp.round(jnp.log2(jnp.where(ax > 0, ax, 1.0)))
  mag = jnp.where((ax > 0) & (e >= e_min), jnp.ldexp(jnp.ones_like(x), jnp.minimum(e, e_max).astype(jnp.int32)), 0.0)
  q = jnp.sign(x) * mag
  return x + lax.stop_gradient(q - x)


# ---------------------------------------------------------------------------------------------------------------------
# Fixed point.


def fixed_point_range(word_bits: int, frac_bits: int) -> tuple[float, float]:
  step = 2.0 ** -frac_bits
  return -(2 ** (word_bits - 1)) * step, (2 ** (word_bits - 1) - 1) * step


def fixed_point(x: jax.Array, word_bits: int, frac_bits: int, rounding: str = "nearest",
                key: jax.Array | None = None) -> jax.Array:
  """Saturating fixed point ``Q<W, F>``; gradient straight-through inside the range, 0 where saturated."""
  scale = 2.0 ** frac_bits
  lo, hi = fixed_point_range(word_bits, frac_bits)
  u = bounded(x, lo, hi) * scale
  if rounding == "nearest":  # not floor(u + 0.5): the sum rounds in float (0.49999997 + 0.5 is 1)
    r = jnp.floor(u)
    r = r + (u - r >= 0.5).astype(u.dtype)
  elif rounding == "stochastic":
    if key is None:
      raise ValueError("stochastic rounding needs a PRNG key")
    r = jnp.floor(u + jax.random.uniform(key, u.shape, u.dtype))
  else:
    raise ValueError(f"unknown rounding {rounding!r}; choose 'nearest' or 'stochastic'")
  r = jnp.clip(r, -(2 ** (word_bits - 1)), 2 ** (word_bits - 1) - 1)  # stochastic rounding may step past hi
  return (r + (u - lax.stop_gradient(u))) / scale  # exactly r / scale (u + (r - u) rounds), gradient 1


def data_key(x: jax.Array, salt: int = 0) -> jax.Array:
  """A PRNG key derived from the values of ``x`` (deterministic per input, differs between inputs)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  h = jnp.sum(bits * jnp.uint32(2654435761), dtype=jnp.uint32) ^ jnp.uint32(x.size)
  return jax.random.fold_in(jax.random.key(salt), h)


# ---------------------------------------------------------------------------------------------------------------------
# LSQ.


def lsq_levels(bits: int, signed: bool | jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(Q_n, Q_p)`` of Esser et al.: signed ``(2^(b-1), 2^(b-1) - 1)``, unsigned ``(0, 2^b - 1)``."""
  signed = jnp.asarray(signed)
  qn = jnp.where(signed, 2.0 ** (bits - 1), 0.0)
  qp = jnp.where(signed, 2.0 ** (bits - 1) - 1, 2.0 ** bits - 1)
  return qn, qp


def grad_scale(x: jax.Array, g: jax.Array | float) -> jax.Array:
  """Value ``x``, gradient multiplied by ``g``."""
  return lax.stop_gradient(x - x * g) + x * g


def lsq(x: jax.Array, step: jax.Array, qn: jax.Array, qp: jax.Array, g: jax.Array | float) -> jax.Array:
  """LSQ fake quantization ``round(clip(x / s, -Q_n, Q_p)) * s`` with gradient scale ``g`` on ``s``."""
  s = grad_scale(step, g)
  v = x / s
  c = jnp.where(v <= -qn, -qn, jnp.where(v >= qp, qp, v))  # gradient to v only strictly inside
  return (c + lax.stop_gradient(jnp.round(c) - c)) * s


def lsq_grad_scale(num_elements: int, qp: jax.Array) -> jax.Array:
  return 1.0 / jnp.sqrt(num_elements * qp)


# ---------------------------------------------------------------------------------------------------------------------
# FakeQuant dispatch.


def _per_channel(module, v: jax.Array, x: jax.Array) -> jax.Array:
  if module.spec.per_channel:
    shape = [1] * x.ndim
    shape[module.spec.channel_axis % x.ndim] = -1
    return v.reshape(shape)
  return v


def _key(module, x: jax.Array) -> jax.Array:
  if module.has_rng("quantize"):
    return module.make_rng("quantize")
  return data_key(x, zlib.crc32("/".join(module.path).encode()) % (2**31))


def apply_spec(module, x: jax.Array) -> jax.Array:
  """Fake-quantize ``x`` in a calibrated ``FakeQuant`` whose spec kind is 'pot', 'fixed_point' or 'lsq'."""
  from fatq.layers import STATS, THRESHOLDS

  s = module.spec
  if s.kind == "fixed_point":
    key = _key(module, x) if s.rounding == "stochastic" else None
    return fixed_point(x, s.bits, s.frac_bits, s.rounding, key)
  t_left, t_right = module.get_variable(STATS, "min"), module.get_variable(STATS, "max")
  t_max = jnp.maximum(jnp.abs(t_left), jnp.abs(t_right))
  if s.kind == "pot":
    return pot(x, s.bits, _per_channel(module, t_max, x))
  if s.kind == "lsq":
    signed = jnp.min(t_left) < 0 if s.signed is None else jnp.asarray(s.signed)
    qn, qp = lsq_levels(s.bits, signed)
    init = jnp.maximum(t_max, 1e-8) / qp
    if s.trainable and (module.has_variable(THRESHOLDS, "step") or module.is_mutable_collection(THRESHOLDS)):
      step = module.variable(THRESHOLDS, "step", lambda: init.astype(jnp.float32)).value
    else:
      step = init
    step = jnp.maximum(step, 1e-8)
    is_weight = module.name is not None and module.name.startswith("kernel")
    n = x.size if is_weight or x.ndim < 2 else x.size // x.shape[0]
    if s.per_channel:
      n = n // x.shape[s.channel_axis % x.ndim]
    return lsq(x, _per_channel(module, step, x), qn, qp, lsq_grad_scale(n, qp))
  raise ValueError(f"unknown quantizer kind {s.kind!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Intrinsic fixed-point layers.


def intrinsic_matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None, word_bits: int, frac_bits: int,
                     rounding: str = "nearest", key: jax.Array | None = None) -> jax.Array:
  """``x (M, K) @ w (K, C) + bias`` with every product, partial sum and the bias addition quantized (in k order)."""
  k_dim = x.shape[-1]
  stochastic = rounding == "stochastic"
  if stochastic and key is None:
    raise ValueError("stochastic rounding needs a PRNG key")
  keys = jax.random.split(key, 2 * k_dim + 1) if stochastic else None

  def q(v, i):
    return fixed_point(v, word_bits, frac_bits, rounding, keys[i] if stochastic else None)

  acc = q(x[:, 0, None] * w[0], 0)

  def body(acc, inputs):
    xk, wk, k = inputs
    kp = keys[2 * k - 1] if stochastic else None
    ka = keys[2 * k] if stochastic else None
    p = fixed_point(xk[:, None] * wk, word_bits, frac_bits, rounding, kp)
    return fixed_point(acc + p, word_bits, frac_bits, rounding, ka), None

  if k_dim > 1:
    acc, _ = lax.scan(body, acc, (x[:, 1:].T, w[1:], jnp.arange(1, k_dim)))
  if bias is not None:
    acc = q(acc + bias, 2 * k_dim)
  return acc


def conv_patches(x: jax.Array, kernel_hw, strides, pads) -> jax.Array:
  """``(N, Ho, Wo, C*kh*kw)`` image patches, features channel-major ``(c, i, j)``."""
  return lax.conv_general_dilated_patches(x, tuple(kernel_hw), tuple(strides), pads,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))


def kernel_matrix(kernel: jax.Array) -> jax.Array:
  """HWIO kernel as the ``(I*H*W, O)`` matrix matching :func:`conv_patches`' feature order."""
  kh, kw, ci, co = kernel.shape
  return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(ci * kh * kw, co)


def intrinsic_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, strides, pads, spec,
                   key: jax.Array | None = None) -> jax.Array:
  """Intrinsic fixed-point convolution (groups = 1) through its patch matrix."""
  kh, kw = kernel.shape[:2]
  p = conv_patches(x, (kh, kw), strides, pads)
  n, ho, wo, k = p.shape
  y = intrinsic_matmul(p.reshape(n * ho * wo, k), kernel_matrix(kernel), bias, spec.bits, spec.frac_bits,
                       spec.rounding, key)
  return y.reshape(n, ho, wo, -1)


def intrinsic_spec(module):
  """The fixed-point spec of ``module``'s ``output`` point if it asks for intrinsic placement (and the model is not
  being calibrated), else None."""
  from fatq.layers import calibrating, point_name

  if module.quant is None or calibrating(module):
    return None
  spec = module.quant.spec_for(point_name(module, "output"))
  if spec is not None and spec.kind == "fixed_point" and spec.placement == "intrinsic":
    return spec
  return None


def intrinsic_key(module, x: jax.Array, spec) -> jax.Array | None:
  if spec.rounding != "stochastic":
    return None
  if module.has_rng("quantize"):
    return module.make_rng("quantize")
  return data_key(x, zlib.crc32("/".join(module.path).encode()) % (2**31))


def num_bits_for(levels: int) -> int:
  return max(1, math.ceil(math.log2(max(levels, 2))))
