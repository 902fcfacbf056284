"""TFLite's integer kernels in JAX: a full-integer ``.tflite`` model evaluated as the interpreter computes it.

The fake-quant model that FAT trains and the exported file describe the same quantized network, but compute it in
different arithmetic: the first rounds float32 convolutions of dequantized values onto the output grid, the second
requantizes int32 accumulators (with a 31-bit fixed-point multiplier in TFLite's reference kernels, in float32 in the
XNNPACK delegate the interpreter uses by default). They differ by single rounding flips which the network amplifies
layer by layer (docs/export.md). :class:`IntegerModel` reads the file and computes its integer arithmetic in JAX,
batched and jitted, so that the exported model can be evaluated (and compared layer by layer) without the
interpreter, and so that tests can prove that fatq knows what the file computes: its codes equal those of the
interpreter, with either kernel set, exactly.

The formulas (TFLite ``kernels/internal/common.h``, ``reference_integer_ops``; ``round`` is half away from zero,
``/`` on integers truncates toward zero as in C):

* ``QuantizeMultiplier(m) = (M, e)`` with ``m = M 2^(e - 31)``, ``M = round(frexp(m).mantissa 2^31)`` in
  ``[2^30, 2^31)``.
* ``SRDHM(a, b) = (a b + (2^30 if a b >= 0 else 1 - 2^30)) / 2^31`` (saturating rounding doubling high multiply).
* ``RDBP(x, e) = (x >> e) + [(x & (2^e - 1)) > ((2^e - 1) >> 1) + [x < 0]]`` (rounding divide by 2^e, ties away
  from zero).
* ``MBQM(x, M, e) = RDBP(SRDHM(x 2^max(e, 0), M), max(-e, 0))``.
* CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED: ``y = clamp(MBQM(sum (x - zx)(w - zw) + b, QM(sx sw / sy)) + zy)``
  per output channel, where the clamp is the fused activation's range on the output grid. FULLY_CONNECTED's
  reference kernel (ai-edge-litert 2.3, measured) uses the single-rounding form ``MBQM1(x, M, e) = (x M +
  2^(30 - e)) >> (31 - e)``.
* ADD: each input ``(x - z) 2^20`` is scaled by ``MBQM(., QM(s / (2 max(s1, s2))))``, the sum by
  ``MBQM(., QM(2 max(s1, s2) / (2^20 sy))) + zy``.
* AVERAGE_POOL_2D: ``y = round(sum x / n)`` (same scale and zero point); MEAN over the spatial axes (a scale of its
  own): ``y = MBQM(sum (x - zx), M', e - f) + zy`` with ``(M, e) = QM(sx / sy)``, ``f = min(floor(log2 n), 32,
  31 + e)`` and ``M' = (M 2^f) / n``: the division by ``n`` folded into the multiplier (measured equal to the
  reference kernel; dividing ``MBQM(sum, M, e)`` by ``n`` afterwards is not). MAX_POOL_2D, MINIMUM, MAXIMUM, RESHAPE
  and PAD act on the codes; RELU, RELU6, RELU_N1_TO_1: ``clamp(MBQM(x - zx, QM(sx / sy)) + zy)``.
* QUANTIZE: float ``round(x / s) + z``, or ``MBQM(x - z1, QM(s1 / s2)) + z2`` between integer types; DEQUANTIZE:
  ``(q - z) s``.
* SOFTMAX (output scale 1/256): with ``d = x - max(x)`` along the last axis and ``(M, e) = QM(beta sx 2^26)``, the
  entries with ``d >= -floor(31 2^(26 - e))`` get ``E = exp(SRDHM(d 2^e, M))`` in gemmlowp's fixed point (Q5.26 in,
  Q0.31 out), ``S = sum RDBP(E, 12)`` (Q12.19), ``y = RDBP(SRDHM(R, E), 12 - c + 23) + min`` with ``c`` the leading
  zeros of ``S`` and ``R = 1 / (S 2^(c - 12))`` by gemmlowp's Newton-Raphson; the others get ``min``, the output
  type's lowest code. The reference kernel aborts (a shift over 31 bits) where ``S >= 512``: this one goes on.

The interpreter's default, the XNNPACK delegate, requantizes in float32 instead (measured equal, bit for bit, on
the LeNet-5 and MobileNet v1/v2 exports; ``kernels='xnnpack'``):

* CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED: ``y = clamp(rint(float32(acc) * s) + zy)``, ``s = float32(sx sw) / sy``
  in float32, ``rint`` ties to even; QUANTIZE from float: ``rint(x * float32(1 / s)) + z``. ADD: XNNPACK's 21-bit
  multipliers of ``float32(s1 / sy)``, ``float32(s2 / sy)`` and a shift, rounding ties up (:func:`add_codes`; it
  differs from the reference ADD on ~3e-5 of the codes, measured on the MobileNet v2 PTQ int8 file). MEAN: the sum
  requantized once, ``rint(float32(sum (x - zx)) * (float32(sx) / (n float32(sy)))) + zy``. The other pools as above
  (AVERAGE_POOL_2D is not delegated: TFLite's own kernel runs it).
* SOFTMAX is not delegated either: TFLite's optimized kernel reads ``e = expf(-float32(sx beta) (max - x))`` from a
  table of 256 (the C library's ``expf``, not always correctly rounded), sums the row in order in float32 and outputs
  ``round(e / (sum 2^-8)) + zy`` (``std::round`` for int8, ``+ 0.5`` truncated for uint8).

Accumulators are computed by float64 convolutions of integer values (exact below 2^53, and as fast as float32 on
XLA:CPU where its int32 convolution is not), the fixed-point steps in int64.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["IntegerModel", "UnsupportedOpError", "add_codes", "cut_model", "input_codes", "output_values",
           "quantize_multiplier", "multiply_by_quantized_multiplier"]


class UnsupportedOpError(ValueError):
  """The .tflite model has an operator (or a type of one) that :class:`IntegerModel` does not implement."""


# ---------------------------------------------------------------------------------------------------------------------
# TFLite's fixed-point arithmetic (kernels/internal/common.h, quantization_util.cc).


def _round_half_away(v):
  """C's ``round``: the nearest integer, ties away from zero (numpy, or jax.numpy for JAX arrays)."""
  xp = jnp if isinstance(v, jax.Array) else np
  return xp.sign(v) * xp.floor(xp.abs(v) + 0.5)


def _truncating_divide_by_pot(x, e: int):
  """C's ``x / 2^e`` on integers: truncation toward zero."""
  return jnp.where(x >= 0, x >> e, -((-x) >> e))


def quantize_multiplier(m) -> tuple[np.ndarray, np.ndarray]:
  """``QuantizeMultiplier``: real multipliers ``m`` (float64) -> int32 ``M`` and shifts ``e``, ``m = M 2^(e - 31)``."""
  m = np.asarray(m, np.float64)
  q, e = np.frexp(m)
  fixed = _round_half_away(q * 2.0 ** 31).astype(np.int64)
  carry = fixed == 2 ** 31
  fixed, e = np.where(carry, fixed // 2, fixed), np.where(carry, e + 1, e)
  tiny = e < -31
  fixed, e = np.where(tiny, 0, fixed), np.where(tiny, 0, e)
  return fixed.astype(np.int64), e.astype(np.int64)


def _srdhm(a, b):
  """SaturatingRoundingDoublingHighMul on int64 arrays that hold int32 values."""
  ab = a * b
  t = ab + jnp.where(ab >= 0, 1 << 30, 1 - (1 << 30))
  q = _truncating_divide_by_pot(t, 31)
  return jnp.where((a == b) & (a == -2 ** 31), 2 ** 31 - 1, q)


def _rounding_divide_by_pot(x, e):
  mask = (jnp.int64(1) << e) - 1
  threshold = (mask >> 1) + (x < 0)
  return (x >> e) + ((x & mask) > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift, single_rounding: bool = False):
  """``MultiplyByQuantizedMultiplier(x, M, e)``: ``x m`` rounded as TFLite does (int64 arrays holding int32).

  ``single_rounding``: TFLite's ``TFLITE_SINGLE_ROUNDING`` form, ``(x M + 2^(30 - e)) >> (31 - e)`` (one rounding,
  ties up), instead of SRDHM then RDBP (two roundings, ties away from zero)."""
  x, multiplier, shift = (jnp.asarray(v, jnp.int64) for v in (x, multiplier, shift))
  if single_rounding:
    total = 31 - shift
    return (x * multiplier + (jnp.int64(1) << (total - 1))) >> total
  left, right = jnp.maximum(shift, 0), jnp.maximum(-shift, 0)
  return _rounding_divide_by_pot(_srdhm(x * (jnp.int64(1) << left), multiplier), right)


def input_codes(x: np.ndarray, scale, zero_point, dtype) -> np.ndarray:
  """Float images -> integer input codes with fatq's own quantizer formula (``fatq.quantizers.quantize``) in float32,
  so that an integer-input model gets exactly the codes of the JAX model's input quantizer."""
  info = np.iinfo(dtype)
  s, zp = np.float32(scale), int(zero_point)
  lo, hi = np.float32(info.min - zp) * s, np.float32(info.max - zp) * s
  return (np.floor((np.clip(x.astype(np.float32), lo, hi) - lo) / s + np.float32(0.5)) + info.min).astype(dtype)


def output_values(y: np.ndarray, scale, zero_point) -> np.ndarray:
  """Integer output codes -> float32 values ``(y - z) s``, computed in float64."""
  return ((y.astype(np.float64) - int(zero_point)) * np.float64(scale)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# The flatbuffer, read with the schema that ai-edge-litert ships.

_TYPES = {0: np.float32, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
_ACTIVATIONS = {0: None, 1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}  # NONE, RELU, RELU_N1_TO_1, RELU6


@dataclass
class _Tensor:
  name: str
  shape: tuple[int, ...]
  dtype: type
  scale: np.ndarray | None  # float32 as stored, one per channel or one
  zero_point: np.ndarray | None
  axis: int
  value: np.ndarray | None = None  # constant tensors


@dataclass
class _Op:
  name: str
  inputs: list[int]
  outputs: list[int]
  options: dict = field(default_factory=dict)


def _read(model: bytes) -> tuple[dict[int, _Tensor], list[_Op], list[int], list[int]]:
  from ai_edge_litert import schema_py_generated as schema

  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  m = schema.ModelT.InitFromPackedBuf(model, 0)
  if len(m.subgraphs) != 1:
    raise UnsupportedOpError(f"the model has {len(m.subgraphs)} subgraphs; IntegerModel evaluates one")
  g = m.subgraphs[0]
  tensors = {}
  for i, t in enumerate(g.tensors):
    if t.type not in _TYPES:
      raise UnsupportedOpError(f"tensor {t.name.decode()!r} has TFLite type {t.type}, not one of int8, uint8, int16, "
                               "int32, int64, float32")
    dtype = _TYPES[t.type]
    q = t.quantization
    quantized = q is not None and q.scale is not None and len(q.scale) > 0
    scale = np.asarray(q.scale, np.float32) if quantized else None
    zp = np.asarray(q.zeroPoint, np.int64) if quantized else None
    value = None
    b = m.buffers[t.buffer] if t.buffer < len(m.buffers) else None
    if b is not None and b.data is not None and len(b.data):
      value = np.frombuffer(np.asarray(b.data, np.uint8).tobytes(), dtype).reshape(t.shape)
    elif b is not None and b.offset > 1:  # large models keep buffers after the flatbuffer
      value = np.frombuffer(model[b.offset:b.offset + b.size], dtype).reshape(t.shape)
    tensors[i] = _Tensor(t.name.decode(), tuple(int(d) for d in t.shape), dtype, scale, zp,
                         int(q.quantizedDimension) if q is not None else 0, value)
  ops = []
  for op in g.operators:
    code = m.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    opts = vars(op.builtinOptions) if op.builtinOptions is not None else {}
    ops.append(_Op(names.get(builtin, f"builtin {builtin}"), [int(i) for i in op.inputs],
                   [int(i) for i in op.outputs], dict(opts)))
  return tensors, ops, [int(i) for i in g.inputs], [int(i) for i in g.outputs]


# ---------------------------------------------------------------------------------------------------------------------
# The kernels. Activations are int64 arrays holding the tensor's integer codes, batch first.


def _info(t: _Tensor):
  return np.iinfo(t.dtype)


def _activation_range(t: _Tensor, fused: int) -> tuple[int, int]:
  """CalculateActivationRangeQuantized: the fused activation's range in the output's codes."""
  info = _info(t)
  lo, hi = int(info.min), int(info.max)
  if fused not in _ACTIVATIONS:
    raise UnsupportedOpError(f"fused activation {fused} on {t.name!r}")
  act = _ACTIVATIONS[fused]
  if act is None:
    return lo, hi
  lo = max(lo, _code(t, act[0]))
  if act[1] is not None:
    hi = min(hi, _code(t, act[1]))
  return lo, hi


def _code(t: _Tensor, v: float) -> int:
  """A real value's code on ``t``'s grid, as TFLite computes activation bounds: ``z + round(v / s)`` in float32."""
  return int(t.zero_point[0]) + int(_round_half_away(np.float32(v) / np.float32(t.scale[0])))


def _requantize_fp32(acc, t_in, t_w, t_out, fused: int):
  """XNNPACK's requantization: ``rint(float32(acc) * scale) + zy``, ``scale = sx * sw / sy`` in float32, ties to
  even, then the clamp."""
  scale = (np.float32(t_in.scale[0]) * t_w.scale.astype(np.float32)) / np.float32(t_out.scale[0])
  y = jnp.round(acc.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(jnp.int64) + int(t_out.zero_point[0])
  lo, hi = _activation_range(t_out, fused)
  return jnp.clip(y, lo, hi)


def _requantize(acc, t_in, t_w, t_out, fused: int, single_rounding: bool = False, kernels: str = "reference"):
  if kernels == "xnnpack":
    return _requantize_fp32(acc, t_in, t_w, t_out, fused)
  scales_w = t_w.scale.astype(np.float64)
  real = np.float64(t_in.scale[0]) * scales_w / np.float64(t_out.scale[0])
  mult, shift = quantize_multiplier(real)
  y = multiply_by_quantized_multiplier(acc, mult, shift, single_rounding) + int(t_out.zero_point[0])
  lo, hi = _activation_range(t_out, fused)
  return jnp.clip(y, lo, hi)


def _padding(p: int) -> str:
  return {0: "SAME", 1: "VALID"}[p]


def _weights_minus_zero_point(t: _Tensor, axis: int) -> np.ndarray:
  w = t.value.astype(np.float64)
  if t.zero_point is not None and np.any(t.zero_point != 0):
    shape = [1] * w.ndim
    shape[axis] = -1
    w = w - t.zero_point.reshape(shape) if len(t.zero_point) > 1 else w - t.zero_point[0]
  return w


def _conv(x, tensors, op, depthwise: bool, kernels: str = "reference"):
  t_in, t_w, t_out = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
  o = op.options
  xz = (x - int(t_in.zero_point[0])).astype(jnp.float64)  # padding with 0 here = padding with the zero point
  if depthwise:  # 1HWC -> HW1C
    w = _weights_minus_zero_point(t_w, 3).transpose(1, 2, 0, 3)
    groups = x.shape[-1]
  else:  # OHWI -> HWIO
    w = _weights_minus_zero_point(t_w, 0).transpose(1, 2, 3, 0)
    groups = 1
  acc = lax.conv_general_dilated(xz, jnp.asarray(w), (o["strideH"], o["strideW"]), _padding(o["padding"]),
                                 rhs_dilation=(o["dilationHFactor"], o["dilationWFactor"]),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                 precision=lax.Precision.HIGHEST)
  acc = jnp.round(acc).astype(jnp.int64)
  if len(op.inputs) > 2 and op.inputs[2] >= 0:
    acc = acc + tensors[op.inputs[2]].value.astype(np.int64)
  return _requantize(acc, t_in, t_w, t_out, o["fusedActivationFunction"], kernels=kernels)


def _fully_connected(x, tensors, op, kernels: str = "reference"):
  t_in, t_w, t_out = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
  w = _weights_minus_zero_point(t_w, 0)  # (out, in)
  xz = (x.reshape(-1, w.shape[1]) - int(t_in.zero_point[0])).astype(jnp.float64)
  acc = jnp.round(jnp.dot(xz, jnp.asarray(w.T), precision=lax.Precision.HIGHEST)).astype(jnp.int64)
  if len(op.inputs) > 2 and op.inputs[2] >= 0:
    acc = acc + tensors[op.inputs[2]].value.astype(np.int64)
  # measured: the reference FULLY_CONNECTED kernel rounds once, the convolutions twice (tests/test_integer.py)
  y = _requantize(acc, t_in, t_w, t_out, op.options["fusedActivationFunction"], single_rounding=True, kernels=kernels)
  return y.reshape((x.shape[0],) + t_out.shape[1:]) if op.options.get("keepNumDims") else y


def add_codes(a, b, scale_a, scale_b, scale_out, kernels: str = "reference"):
  """TFLite's ADD on codes relative to their zero points (int64 arrays), float32 scales given as numbers: the sum's
  codes relative to the output zero point, before the clamp. Multipliers are computed on the host.

  ``'reference'`` (TFLite's kernels): each input ``a 2^20`` is scaled by ``MBQM(., QM(s_a / (2 max(s_a, s_b))))``, the
  sum by ``MBQM(., QM(2 max(s_a, s_b) / (2^20 s_out)))``, the multipliers in float64 as the kernel preparation does.
  ``'xnnpack'`` (XNNPACK's qs8/qu8 add): ``r_a = float32(s_a / s_out)``, likewise ``r_b``, ``k = 20 - exponent(max(r_a,
  r_b))``, ``M_a = rint(r_a 2^k)`` (21 bits), and ``floor((a M_a + b M_b + 2^(k-1)) / 2^k)``: ties round up."""
  if kernels not in ("reference", "xnnpack"):
    raise ValueError(f"kernels={kernels!r}: choose 'reference' or 'xnnpack'")
  s1, s2, so = (np.float32(s) for s in (scale_a, scale_b, scale_out))
  a, b = jnp.asarray(a, jnp.int64), jnp.asarray(b, jnp.int64)
  if kernels == "xnnpack":
    r1, r2 = s1 / so, s2 / so  # float32 divisions, correctly rounded
    shift = 20 - (int(np.frexp(max(r1, r2))[1]) - 1)
    m1, m2 = (int(np.rint(np.float64(r) * 2.0 ** shift)) for r in (r1, r2))  # exact scaling, ties to even
    return (a * m1 + b * m2 + (1 << (shift - 1))) >> shift
  left_shift = 20
  twice_max = np.float64(np.float32(2) * max(s1, s2))
  m1, e1 = quantize_multiplier(np.float64(s1) / twice_max)
  m2, e2 = quantize_multiplier(np.float64(s2) / twice_max)
  mo, eo = quantize_multiplier(twice_max / np.float64(np.float32(1 << left_shift) * so))
  a = multiply_by_quantized_multiplier(a << left_shift, m1, e1)
  b = multiply_by_quantized_multiplier(b << left_shift, m2, e2)
  return multiply_by_quantized_multiplier(a + b, mo, eo)


def _add(a, b, tensors, op, kernels: str = "reference"):
  t1, t2, t_out = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
  y = add_codes(a - int(t1.zero_point[0]), b - int(t2.zero_point[0]), t1.scale[0], t2.scale[0], t_out.scale[0],
                kernels)
  lo, hi = _activation_range(t_out, op.options.get("fusedActivationFunction", 0))
  return jnp.clip(y + int(t_out.zero_point[0]), lo, hi)


def divide_round_half_away(total: jax.Array, n) -> jax.Array:
  """``round(total / n)`` in integers, ties away from zero, for ``n > 0``: how TFLite's AVERAGE_POOL_2D divides a
  window's sum of codes by its size."""
  return jnp.sign(total) * ((jnp.abs(total) + n // 2) // n)


def _pool(x, tensors, op, kind: str):
  t_out = tensors[op.outputs[0]]  # the input's grid too (_check_integer_op)
  o = op.options
  window, strides = (1, o["filterHeight"], o["filterWidth"], 1), (1, o["strideH"], o["strideW"], 1)
  pad = _padding(o["padding"])
  if kind == "max":
    y = lax.reduce_window(x, jnp.iinfo(jnp.int64).min, lax.max, window, strides, pad)
  else:  # sum and count over the valid (unpadded) positions; round(sum / count) half away from zero
    total = lax.reduce_window(x, jnp.int64(0), lax.add, window, strides, pad)
    count = lax.reduce_window(jnp.ones(x.shape[:3] + (1,), jnp.int64), jnp.int64(0), lax.add, window, strides, pad)
    y = divide_round_half_away(total, count)
  lo, hi = _activation_range(t_out, o.get("fusedActivationFunction", 0))
  return jnp.clip(y, lo, hi)


def _mean(x, tensors, op, kernels: str = "reference"):
  """MEAN over the spatial axes of NHWC codes (a global average pool with an output grid of its own)."""
  t_in, t_out = tensors[op.inputs[0]], tensors[op.outputs[0]]
  n = x.shape[1] * x.shape[2]
  total = jnp.sum(x - int(t_in.zero_point[0]), axis=(1, 2))
  if kernels == "xnnpack":  # the sum requantized in float32, ties to even
    scale = np.float32(t_in.scale[0]) / (np.float32(n) * np.float32(t_out.scale[0]))
    y = jnp.round(total.astype(jnp.float32) * scale).astype(jnp.int64)
  else:  # QuantizeMultiplier(sx / sy) with the division by n folded into it, as the reference kernel does
    mult, shift = (int(v) for v in quantize_multiplier(np.float64(t_in.scale[0]) / np.float64(t_out.scale[0])))
    fold = min(n.bit_length() - 1, 32, 31 + shift)
    y = multiply_by_quantized_multiplier(total, (mult << fold) // n, shift - fold)
  info = _info(t_out)
  y = jnp.clip(y + int(t_out.zero_point[0]), int(info.min), int(info.max))
  return y.reshape((x.shape[0],) + tuple(t_out.shape[1:]))


def _quantize(x, t_in, t_out, kernels: str = "reference"):
  z = int(t_out.zero_point[0])
  info = _info(t_out)
  if t_in.dtype == np.float32 and kernels == "xnnpack":  # x times the reciprocal scale, ties to even
    y = jnp.round(x.astype(jnp.float32) * (np.float32(1) / np.float32(t_out.scale[0]))).astype(jnp.int64) + z
  elif t_in.dtype == np.float32:
    s = np.float32(t_out.scale[0])
    v = x.astype(jnp.float32) / s
    y = _round_half_away(v).astype(jnp.int64) + z
  else:
    mult, shift = quantize_multiplier(np.float64(t_in.scale[0]) / np.float64(t_out.scale[0]))
    y = multiply_by_quantized_multiplier(x - int(t_in.zero_point[0]), mult, shift) + z
  return jnp.clip(y, int(info.min), int(info.max))


def _relu(x, t_in, t_out, lo: float, hi: float | None):
  """RELU / RELU6 / RELU_N1_TO_1: requantize to the output grid, then clamp to the activation's range there."""
  mult, shift = quantize_multiplier(np.float64(t_in.scale[0]) / np.float64(t_out.scale[0]))
  y = multiply_by_quantized_multiplier(x - int(t_in.zero_point[0]), mult, shift) + int(t_out.zero_point[0])
  info = _info(t_out)
  return jnp.clip(y, max(int(info.min), _code(t_out, lo)),
                  int(info.max) if hi is None else min(int(info.max), _code(t_out, hi)))


_RELUS = {"RELU": (0.0, None), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0)}


# SOFTMAX. The reference kernel computes exp and 1/x in gemmlowp's fixed point (``fixedpoint.h``): a raw int32 ``r``
# with ``i`` integer bits stands for ``r 2^(i - 31)``; products of raws are SRDHM, ``Rescale`` a rounding or
# saturating shift. The optimized kernel, which the interpreter runs by default (XNNPACK does not take a quantized
# SOFTMAX), reads exp from a float32 table instead.


def _wrap32(v):
  """int32 wrap-around of int64 values, as the C kernels' int32 additions overflow."""
  return ((v + 2 ** 31) & (2 ** 32 - 1)) - 2 ** 31


def _saturating_shift_left(x, e: int):
  """gemmlowp's ``SaturatingRoundingMultiplyByPOT<e>`` for ``e > 0``: ``x 2^e``, saturated to int32."""
  threshold = (1 << (31 - e)) - 1
  return jnp.where(x > threshold, 2 ** 31 - 1, jnp.where(x < -threshold, -2 ** 31, x << e))


def _exp_on_negative_values(a):
  """gemmlowp's ``exp_on_negative_values``: Q5.26 raws ``a <= 0`` -> ``exp(a)`` as Q0.31 raws. ``exp`` of the
  remainder in ``[-1/4, 0)`` by a Taylor polynomial around -1/8, then times ``exp(-2^k)`` for each bit ``k`` of the
  rest."""
  quarter = 1 << 24  # 1/4 in Q5.26
  a_mod = (a & (quarter - 1)) - quarter
  x = _saturating_shift_left(a_mod, 5) + (1 << 28)  # Rescale<0>, then + 1/8 in Q0.31
  x2 = _srdhm(x, x)
  x3 = _srdhm(x2, x)
  x4_over_4 = _rounding_divide_by_pot(_srdhm(x2, x2), 2)
  poly = _rounding_divide_by_pot(_wrap32(_srdhm(_wrap32(x4_over_4 + x3), 715827883) + x2), 1)  # 715827883: 1/3
  result = _wrap32(1895147668 + _srdhm(1895147668, _wrap32(x + poly)))  # 1895147668: exp(-1/8)
  remainder = a_mod - a
  for k, multiplier in zip(range(-2, 5), (1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242)):
    result = jnp.where((remainder & (1 << (26 + k))) != 0, _srdhm(result, multiplier), result)  # exp(-2^k)
  return jnp.where(a == 0, 2 ** 31 - 1, result)


def _one_over_one_plus_x(a):
  """gemmlowp's ``one_over_one_plus_x_for_x_in_0_1``: Q0.31 raws of ``x`` in [0, 1) -> ``1 / (1 + x)``, three
  Newton-Raphson steps on the half denominator in Q2.29."""
  total = a + (2 ** 31 - 1)  # RoundingHalfSum(a, One): (a + b + sign) / 2, truncated toward zero
  total = total + jnp.where(total >= 0, 1, -1)
  half_denominator = _truncating_divide_by_pot(total, 1)
  x = _wrap32(1515870810 + _srdhm(half_denominator, -1010580540))  # 48/17 - 32/17 d
  for _ in range(3):
    error = _wrap32((1 << 29) - _srdhm(half_denominator, x))
    x = _wrap32(x + _saturating_shift_left(_srdhm(x, error), 2))
  return _saturating_shift_left(x, 1)


def _softmax_reference(x, t_in, t_out, beta: float):
  """TFLite's reference int8 / uint8 SOFTMAX (``reference_ops::Softmax``) over the last axis of the codes ``x``."""
  info = _info(t_out)
  real = min(float(np.float32(beta)) * float(t_in.scale[0]) * 2.0 ** 26, 2.0 ** 31 - 1)  # PreprocessSoftmaxScaling
  multiplier, left_shift = (int(v) for v in quantize_multiplier(real))
  diff_min = -int(np.floor(31 * 2.0 ** 26 / 2.0 ** left_shift))  # -CalculateInputRadius(5, left_shift)
  diff = x - jnp.max(x, axis=-1, keepdims=True)
  used = diff >= diff_min
  exp = _exp_on_negative_values(_srdhm(jnp.where(used, diff, 0) << left_shift, multiplier))
  total = jnp.sum(jnp.where(used, _rounding_divide_by_pot(exp, 12), 0), axis=-1, keepdims=True)  # in Q12.19
  headroom = lax.clz(total.astype(jnp.uint32)).astype(jnp.int64)
  scale = _one_over_one_plus_x((total << headroom) - 2 ** 31)  # 1 / (total 2^(headroom - 12)) in Q0.31
  y = _rounding_divide_by_pot(_srdhm(scale, exp), 12 - headroom + 31 - 8) + int(info.min)
  return jnp.where(used, jnp.clip(y, int(info.min), int(info.max)), int(info.min))


@functools.lru_cache(maxsize=None)
def _c_expf():
  """The C library's ``expf``, which TFLite's kernels call, or None where there is no C math library to load."""
  name = ctypes.util.find_library("m")
  try:
    expf = ctypes.CDLL(name).expf if name else None
  except (OSError, AttributeError):
    return None
  if expf is not None:
    expf.restype, expf.argtypes = ctypes.c_float, [ctypes.c_float]
  return expf


def _expf(x: np.ndarray) -> np.ndarray:
  """float32 ``exp`` as the C library computes it: its last bit differs from the correctly rounded exp on ~5e-4 of
  softmax table entries (glibc, measured), and a table entry one bit off changes the probability codes near ties.
  The correctly rounded exp where the C library cannot be loaded."""
  expf = _c_expf()
  if expf is None:
    return np.exp(x.astype(np.float64)).astype(np.float32)
  return np.array([expf(float(v)) for v in np.ravel(x)], np.float32).reshape(np.shape(x))


def _softmax_table(x, t_in, t_out, beta: float):
  """TFLite's optimized int8 / uint8 SOFTMAX (``optimized_ops::Softmax`` with ``PopulateSoftmaxLookupTable``):
  ``e = table[255 - max + x] = expf(-s beta (max - x))`` in float32, summed in order along the last axis, then
  ``round(e / (sum s_y)) + z_y``: ``std::round`` for int8, ``+ 0.5`` truncated for uint8."""
  scale = np.float32(-np.float32(t_in.scale[0]) * np.float32(beta))
  table = _expf(scale * np.arange(256, dtype=np.float32))  # by max - x
  e = jnp.asarray(table)[jnp.max(x, axis=-1, keepdims=True) - x]
  total = lax.scan(lambda s, v: (s + v, None), jnp.zeros(e.shape[:-1], jnp.float32), jnp.moveaxis(e, -1, 0))[0]
  p = e * (np.float32(1) / (total[..., None] * np.float32(t_out.scale[0])))
  if t_out.dtype == np.uint8:
    y = (p + np.float32(0.5)).astype(jnp.int64)
  else:
    p = p.astype(jnp.float64)  # std::round, exact in float64
    y = _round_half_away(p).astype(jnp.int64) + int(t_out.zero_point[0])
  info = _info(t_out)
  return jnp.clip(y, int(info.min), int(info.max))


def _constant(t: _Tensor):
  if t.value is None:
    raise UnsupportedOpError(f"tensor {t.name!r} is neither computed before its use nor a constant")
  return jnp.asarray(t.value.astype(np.int64) if t.dtype != np.float32 else t.value)


def _needed(ops: list[_Op], output: int) -> list[_Op]:
  """The ops that ``output`` depends on, in model order."""
  want, keep = {output}, []
  for op in reversed(ops):
    if want & set(op.outputs):
      keep.append(op)
      want |= {i for i in op.inputs if i >= 0}
  return keep[::-1]


def _tensor_index(tensors: dict[int, _Tensor], tensor: int | str) -> int:
  names = {t.name: i for i, t in tensors.items()}
  if tensor not in tensors and tensor not in names:
    raise ValueError(f"output={tensor!r}: no such tensor index or name in the model")
  return tensor if tensor in tensors else names[tensor]


def cut_model(model: bytes, output: int | str) -> bytes:
  """The .tflite ``model`` ending at its tensor ``output`` (index or name): the operators that tensor needs, with it
  as the only output. The interpreter frees inner tensors, and its XNNPACK delegate cannot be told to keep them
  (``experimental_preserve_all_tensors`` turns the delegate off): cutting is how to read, e.g., the logits before a
  SOFTMAX with the interpreter's default kernels."""
  import flatbuffers
  from ai_edge_litert import schema_py_generated as schema

  tensors, ops, _, _ = _read(model)
  index = _tensor_index(tensors, output)
  m = schema.ModelT.InitFromPackedBuf(model, 0)
  if any(b.offset > 1 for b in m.buffers):
    raise ValueError("cut_model: the model keeps its buffers outside the flatbuffer (over 2 GB); not supported")
  g = m.subgraphs[0]
  needed = {id(o) for o in _needed(ops, index)}
  g.operators = [op for op, o in zip(g.operators, ops) if id(o) in needed]
  g.outputs = np.asarray([index], np.int32)
  builder = flatbuffers.Builder(len(model) + 1024)
  builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
  return bytes(builder.Output())


def _check_integer_op(op: _Op, tensors: dict[int, _Tensor]) -> None:
  """Integer tensors with quantization parameters around every op but QUANTIZE / DEQUANTIZE; one grid for the ops
  that act on codes."""
  for i in op.inputs + op.outputs:
    t = tensors.get(i) if i >= 0 else None
    if t is None or (op.name in ("QUANTIZE", "DEQUANTIZE") and t.dtype == np.float32):
      continue
    if t.dtype in (np.int32, np.int64):  # shapes, int32 biases, paddings
      continue
    if t.dtype == np.int16:  # the 16x8 scheme has kernels of its own (ADD's shift is 15, 64-bit biases, ...)
      raise UnsupportedOpError(f"{op.name} tensor {t.name!r} is int16: IntegerModel evaluates int8 / uint8 models")
    if t.dtype == np.float32 or t.scale is None:
      raise UnsupportedOpError(f"{op.name} tensor {t.name!r} is {t.dtype.__name__}"
                               + (" without quantization parameters" if t.dtype != np.float32 else "")
                               + ": not a full-integer model (export one with fatq.export)")
  if op.name == "MEAN":
    axes = sorted({int(a) % 4 for a in np.ravel(tensors[op.inputs[1]].value)})
    if len(tensors[op.inputs[0]].shape) != 4 or axes != [1, 2]:
      raise UnsupportedOpError(f"MEAN {tensors[op.outputs[0]].name!r} over axes {axes} of a "
                               f"{len(tensors[op.inputs[0]].shape)}-D tensor: IntegerModel computes the spatial "
                               "mean of NHWC tensors (axes 1 and 2) only")
  if op.name in ("MINIMUM", "MAXIMUM", "MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "PAD"):
    a, y = tensors[op.inputs[0]], tensors[op.outputs[0]]
    if not (np.array_equal(a.scale, y.scale) and np.array_equal(a.zero_point, y.zero_point)):
      raise UnsupportedOpError(f"{op.name} {y.name!r} changes scale or zero point, which IntegerModel does not do")


# ---------------------------------------------------------------------------------------------------------------------


class IntegerModel:
  """A full-integer .tflite model evaluated in JAX with TFLite's integer arithmetic (see the module docstring).

  ``kernels='reference'``: the arithmetic of TFLite's reference kernels (``OpResolverType.BUILTIN_REF``);
  ``'xnnpack'``: that of the interpreter's default XNNPACK delegate (float32 requantization). ``output``: a tensor
  index or name to stop at instead of the model's output.

  ``raw(x)``: a batch in the model's input dtype -> its output in the output dtype, the codes that the chosen kernels
  produce. ``__call__(images)``: float images -> the float output (logits, or probabilities after a SOFTMAX), the
  input quantized as :class:`fatq.export.TFLiteModel` does it and the output dequantized. ``raw(x, keep=True)``: the
  codes of every tensor (by TFLite tensor index) for layer-by-layer comparisons. Ops: :attr:`SUPPORTED`; others raise
  :class:`UnsupportedOpError` naming the op. SOFTMAX rows whose exps sum to 512 or more, where TFLite's reference kernel
  aborts, get the same fixed-point arithmetic, carried on past its 31-bit shift.
  """

  KERNELS = ("reference", "xnnpack")
  SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "AVERAGE_POOL_2D", "MAX_POOL_2D", "MEAN",
               "RESHAPE", "MINIMUM", "MAXIMUM", "PAD", "QUANTIZE", "DEQUANTIZE", "RELU", "RELU6", "RELU_N1_TO_1",
               "SOFTMAX")

  def __init__(self, model: str | os.PathLike | bytes, batch_size: int = 50, output: int | str | None = None,
               kernels: str = "reference"):
    blob = model if isinstance(model, bytes) else open(model, "rb").read()
    if len(blob) < 8 or blob[4:8] != b"TFL3":
      raise ValueError(f"{model if not isinstance(model, bytes) else 'the bytes given'} is not a TFLite flatbuffer "
                       "(no 'TFL3' identifier)")
    self.tensors, ops, inputs, outputs = _read(blob)
    if len(inputs) != 1:
      raise UnsupportedOpError(f"the model has {len(inputs)} inputs; IntegerModel evaluates models with one")
    if len(outputs) != 1 and output is None:
      raise UnsupportedOpError(f"the model has {len(outputs)} outputs; name the one to evaluate with output= (a "
                               "tensor name or index)")
    self.input, self.output = inputs[0], outputs[0]
    if output is not None:  # evaluate up to another tensor (e.g. the logits before a SOFTMAX)
      self.output = _tensor_index(self.tensors, output)
    self.ops = _needed(ops, self.output)
    bad = sorted({o.name for o in self.ops} - set(self.SUPPORTED))
    if bad:
      raise UnsupportedOpError(f"IntegerModel does not implement the TFLite op(s) {bad}; it evaluates "
                               f"{', '.join(self.SUPPORTED)} (output= can stop before an op it does not)")
    for o in self.ops:
      _check_integer_op(o, self.tensors)
    if kernels not in self.KERNELS:
      raise ValueError(f"kernels={kernels!r}: choose one of {self.KERNELS}")
    self.batch_size = batch_size
    self.kernels = kernels
    with jax.enable_x64(True):
      self._run = jax.jit(self._forward, static_argnames="keep")

  @property
  def input_dtype(self):
    return self.tensors[self.input].dtype

  @property
  def output_dtype(self):
    return self.tensors[self.output].dtype

  @property
  def output_step(self) -> float:
    t = self.tensors[self.output]
    return float(t.scale[0]) if t.dtype != np.float32 else 0.0

  def _forward(self, x, keep: bool = False):
    t_in = self.tensors[self.input]
    vals = {self.input: x.astype(jnp.float32) if t_in.dtype == np.float32 else x.astype(jnp.int64)}

    def get(i):
      return vals[i] if i in vals else _constant(self.tensors[i])

    for op in self.ops:
      ins = [get(i) if i >= 0 else None for i in op.inputs]
      t_out = self.tensors[op.outputs[0]]
      if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        y = _conv(ins[0], self.tensors, op, depthwise=op.name == "DEPTHWISE_CONV_2D", kernels=self.kernels)
      elif op.name == "FULLY_CONNECTED":
        y = _fully_connected(ins[0], self.tensors, op, kernels=self.kernels)
      elif op.name == "ADD":
        y = _add(ins[0], ins[1], self.tensors, op, self.kernels)
      elif op.name in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        y = _pool(ins[0], self.tensors, op, "avg" if op.name == "AVERAGE_POOL_2D" else "max")
      elif op.name == "MEAN":
        y = _mean(ins[0], self.tensors, op, self.kernels)
      elif op.name == "RESHAPE":
        y = ins[0].reshape((ins[0].shape[0],) + t_out.shape[1:])
      elif op.name in ("MINIMUM", "MAXIMUM"):  # the converter keeps one grid on inputs and output
        y = (jnp.minimum if op.name == "MINIMUM" else jnp.maximum)(ins[0], ins[1])
      elif op.name == "PAD":
        pads = np.asarray(self.tensors[op.inputs[1]].value).reshape(-1, 2).tolist()
        pads[0] = [0, 0]  # the batch axis is ours
        fill = int(t_out.zero_point[0]) if t_out.zero_point is not None else 0
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
          fill = int(np.asarray(self.tensors[op.inputs[2]].value).reshape(()))
        y = jnp.pad(ins[0], pads, constant_values=fill)
      elif op.name in _RELUS:
        y = _relu(ins[0], self.tensors[op.inputs[0]], t_out, *_RELUS[op.name])
      elif op.name == "SOFTMAX":
        softmax = _softmax_table if self.kernels == "xnnpack" else _softmax_reference
        y = softmax(ins[0], self.tensors[op.inputs[0]], t_out, op.options.get("beta", 1.0))
      elif op.name == "QUANTIZE":
        y = _quantize(ins[0], self.tensors[op.inputs[0]], t_out, self.kernels)
      else:  # DEQUANTIZE
        t = self.tensors[op.inputs[0]]
        y = ((ins[0] - int(t.zero_point[0])).astype(jnp.float64) * np.float64(t.scale[0])).astype(jnp.float32)
      vals[op.outputs[0]] = y
    out = vals[self.output]
    return vals if keep else out

  def raw(self, x: np.ndarray, keep: bool = False):
    """A batch of inputs in the model's input dtype -> output codes (or every tensor's codes if ``keep``)."""
    want = tuple(self.tensors[self.input].shape[1:])
    if tuple(x.shape[1:]) != want:
      raise ValueError(f"input of shape {tuple(x.shape)}: the model takes (batch,) + {want}")
    with jax.enable_x64(True):
      out = self._run(jnp.asarray(x), keep=keep)
      if keep:
        return {i: np.asarray(v) for i, v in out.items()}
      out = np.asarray(out)
    return out if self.output_dtype == np.float32 else out.astype(self.output_dtype)

  def quantize_input(self, x: np.ndarray) -> np.ndarray:
    t = self.tensors[self.input]
    return x.astype(np.float32) if t.dtype == np.float32 else input_codes(x, t.scale[0], t.zero_point[0], t.dtype)

  def dequantize_output(self, y: np.ndarray) -> np.ndarray:
    t = self.tensors[self.output]
    if t.dtype == np.float32:
      return y.astype(np.float32)
    return output_values(y, t.scale[0], t.zero_point[0])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Float images (N, H, W, C) -> the float output, in batches of ``batch_size`` (the last one padded)."""
    shape = tuple(self.tensors[self.input].shape[1:])
    out, bs = [], self.batch_size
    for i in range(0, len(images), bs):
      x = np.asarray(images[i:i + bs]).reshape((-1,) + shape)
      n = len(x)
      if n < bs and i:
        x = np.concatenate([x, np.repeat(x[-1:], bs - n, axis=0)])
      out.append(self.dequantize_output(self.raw(self.quantize_input(x)))[:n])
    return np.concatenate(out).reshape((len(images),) + tuple(self.tensors[self.output].shape[1:]))
