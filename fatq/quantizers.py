"""Uniform fake quantization and FAT threshold parameterisations: pure JAX functions.

Conventions follow TensorFlow's `FakeQuantWithMinMaxVars`, which the TFLite converter turns into integer
quantization parameters (SPEC §3), so that what is trained here is what an exported model computes:

* An n-bit grid is the integers ``[qmin, qmax]`` with ``qmin = 1 if narrow_range else 0`` and
  ``qmax = 2**n - 1``. TFLite's int8 values are these minus ``2**(n-1)`` (uint8 zero point = int8 zero point + 128).
* A real range ``[lo, hi]`` is *nudged* so that 0 falls exactly on the grid:

      scale      = (hi - lo) / (qmax - qmin)
      zero_point = clip(round(qmin - lo / scale), qmin, qmax)
      nudged_min = (qmin - zero_point) * scale,  nudged_max = (qmax - zero_point) * scale
      x_q        = floor((clip(x, nudged_min, nudged_max) - nudged_min) / scale + 0.5) * scale + nudged_min

* Gradients use the straight-through estimator: ``d round(u) / du = 1``. Clipping passes the gradient inside the
  (closed) nudged range and 0 outside, as TF's fake-quant gradient does. Gradients reach ``lo`` and ``hi`` (and so the FAT scale factors) through ``scale`` and
  ``zero_point``; inside the range ``d x_q / d scale = (q - zero_point) - x / scale`` (the rounding residual), outside
  it is the clipped level.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = 2**31 - 1


def ste_round(x: jax.Array) -> jax.Array:
  """Round half up, ``floor(x + 0.5)`` as TF's fake quant does, with identity gradient."""
  return x + jax.lax.stop_gradient(jnp.floor(x + 0.5) - x)


def bounded(x: jax.Array, lo: jax.Array | float, hi: jax.Array | float) -> jax.Array:
  """``clip(x, lo, hi)`` whose gradient is 1 on the closed interval ``[lo, hi]`` and 0 outside.

  ``jnp.clip`` halves the gradient at the bounds; FAT's scale factors start exactly on a bound (alpha = 1), so the
  bound itself must pass the full gradient.
  """
  return jnp.where((x >= lo) & (x <= hi), x, jnp.clip(x, lo, hi))


def grid(num_bits: int, narrow_range: bool | jax.Array) -> tuple[jax.Array | int, int]:
  """The integer grid ``(qmin, qmax)`` of an n-bit quantizer in TF's unsigned convention.

  ``narrow_range`` may be a traced boolean (signedness decided by calibration statistics inside a jitted step).
  """
  if not 2 <= num_bits <= 16:
    raise ValueError(f"num_bits must be in 2..16, got {num_bits}")
  if isinstance(narrow_range, bool):
    return int(narrow_range), 2**num_bits - 1
  return jnp.where(narrow_range, 1.0, 0.0), 2**num_bits - 1


class QuantParams(NamedTuple):
  """A nudged range: what TFLite stores for a tensor (``real = (q - zero_point) * scale``)."""

  scale: jax.Array
  zero_point: jax.Array  # float-valued integers on the unsigned grid [qmin, qmax]
  qmin: jax.Array | int
  qmax: int

  @property
  def nudged_min(self) -> jax.Array:
    return (self.qmin - self.zero_point) * self.scale

  @property
  def nudged_max(self) -> jax.Array:
    return (self.qmax - self.zero_point) * self.scale


def exact_divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
  """``a / b`` correctly rounded in float32 (as numpy and TFLite compute it), for normal (or zero) ``a`` and normal
  ``b`` with a normal quotient: quantization scales, zero points and multipliers. Elsewhere (a subnormal, infinite or
  NaN operand, a quotient that underflows or overflows) it is XLA's ``a / b``.

  XLA rewrites float divisions under jit (by a constant: times its rounded reciprocal; ``a / (r / c)``: ``a c / r``)
  and then rounds differently by one ulp, ~5% of the time (measured); a quantization scale or requantization
  multiplier must be the same bits in JAX as in the exported file. So the quotient is computed here in integer
  arithmetic, which XLA does not rewrite: a long division of the 24-bit mantissas, rounded to nearest even. The
  gradient is that of ``a / b``.
  """
  if jnp.result_type(a, b) != jnp.float32:  # float64 (x64 mode): no float32 scale to reproduce
    return jnp.divide(a, b)
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return _exact_divide(*jnp.broadcast_arrays(a, b))


@jax.custom_jvp
@jax.jit  # one compiled loop per shape, also when called eagerly (calibration, export)
def _exact_divide(a, b):
  negative, zero = (a < 0) ^ (b < 0), a == 0
  ia, ib = (jax.lax.bitcast_convert_type(jnp.abs(v), jnp.int32) for v in (a, b))
  ea, eb = (ia >> 23) & 0xFF, (ib >> 23) & 0xFF
  ma, mb = (ia & 0x7FFFFF) | 0x800000, (ib & 0x7FFFFF) | 0x800000  # a = ma 2^(ea - 150), b likewise
  big = ma >= mb
  d = jnp.where(big, 2 * mb, mb)  # ma / d in [1/2, 1)
  exponent = ea - eb + 126 + big.astype(jnp.int32)
  # subnormal, infinite or NaN operands, and quotients that underflow to subnormals or overflow: XLA's division
  other = (ea == 0) | (eb == 0) | (ea == 255) | (eb == 255) | (exponent <= 0) | (exponent >= 255)

  def step(_, qr):  # one bit of q = floor(ma 2^24 / d); r < d < 2^25
    q, r = qr
    r = r * 2
    bit = r >= d
    return q * 2 + bit.astype(jnp.int32), jnp.where(bit, r - d, r)

  # a loop, not 24 unrolled steps: one per scale of every quantizer would make programs slow to compile
  q, r = jax.lax.fori_loop(0, 24, step, (jnp.zeros_like(ma), ma))
  up = (2 * r > d) | ((2 * r == d) & (q % 2 == 1))  # to nearest, ties to even
  q = q + up.astype(jnp.int32)
  carry = q == 2**24
  q, exponent = jnp.where(carry, 2**23, q), exponent + carry.astype(jnp.int32)
  y = jax.lax.bitcast_convert_type((exponent << 23) | (q - 2**23), jnp.float32)
  return jnp.where(zero, 0.0, jnp.where(other, a / b, jnp.where(negative, -y, y)))


@_exact_divide.defjvp
def _exact_divide_jvp(primals, tangents):
  (a, b), (da, db) = primals, tangents
  y = _exact_divide(a, b)
  return y, (da - y * db) / b


def nudge(lo: jax.Array, hi: jax.Array, num_bits: int, narrow_range: bool | jax.Array = False) -> QuantParams:
  """Scale and zero point of the range ``[lo, hi]``, nudged so that 0 is exactly representable.

  A range that excludes 0 keeps its width and is shifted to end at 0 (the zero point is clamped to the grid), as TF's
  fake quant and the TFLite converter do. Arrays broadcast,
  so per-channel ranges give per-channel parameters. The rounding of the zero point has a straight-through gradient.
  """
  qmin, qmax = grid(num_bits, narrow_range)
  # A degenerate range (an all-zero channel) would divide by zero; TFLite needs scale > 0.
  scale = exact_divide(jnp.maximum(hi - lo, 1e-8), qmax - qmin)
  # jnp.clip after the rounding halves the zero point's gradient where it rounds onto qmin or qmax (every range with
  # lo in (-scale / 2, 0]); clipping first with `bounded` gives the same integers and the whole gradient, but it
  # changes FAT's trajectories (measured on LeNet-5), so it waits for a re-run of the README tables.
  zero_point = jnp.clip(ste_round(qmin - exact_divide(lo, scale)), qmin, qmax)
  return QuantParams(scale, zero_point, qmin, qmax)


def containing_zero(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``[min(lo, 0), max(hi, 0)]``: a calibrated asymmetric range widened to contain 0, as TFLite's converter makes it.

  Nudging a range that excludes 0 would shift it to end at 0 and clip, e.g., a per-channel weight range [0.5, 1] to
  [0, 0.5] (a depthwise channel has 9 weights, often of one sign).
  """
  return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def fake_quant(x: jax.Array, lo: jax.Array, hi: jax.Array, num_bits: int,
               narrow_range: bool | jax.Array = False) -> jax.Array:
  """Quantize-dequantize ``x`` on the nudged n-bit grid of ``[lo, hi]`` (TF ``fake_quant_with_min_max_vars``).

  ``lo`` and ``hi`` broadcast against ``x`` (scalars, or per-channel vectors along the last axis). Inside the nudged
  range the error is at most ``scale / 2``; values outside are clamped to it.
  """
  p = nudge(lo, hi, num_bits, narrow_range)
  # The zero point's offset on the grid: the output is (code - offset) * scale, as TFLite dequantizes, so that 0 comes
  # out exactly 0 (code * scale + nmin is fused into one multiply-add under jit, which leaves ~1e-8 at 0).
  offset = jax.lax.stop_gradient(p.zero_point - p.qmin)
  shape = jnp.broadcast_shapes(jnp.shape(p.scale), jnp.shape(p.nudged_min))
  return _fake_quant_nudged(x, *(jnp.broadcast_to(v, shape) for v in (p.nudged_min, p.nudged_max, p.scale, offset)))


@jax.custom_vjp
def _fake_quant_nudged(x, nmin, nmax, scale, offset):
  """``floor((clip(x, nmin, nmax) - nmin) / scale + 0.5) * scale + nmin`` with the STE gradient written out.

  ``offset = -nmin / scale`` (an integer) only evaluates the result exactly, as ``(code - offset) * scale``; the
  gradient is that of the formula above, through ``nmin``.

  Autodiff of this expression is correct but slow on XLA:CPU (the backward pass of a fake-quantized activation cost
  ~100 forward passes). With ``c = clip(x, nmin, nmax)``, ``u = (c - nmin) / scale`` and ``r = floor(u + 0.5)``
  (STE: ``dr/du = 1``):

      dy/dx     = 1 on [nmin, nmax], else 0       dy/dscale = r - u
      dy/dnmin  = 1 below nmin, else 0            dy/dnmax  = 1 above nmax, else 0

  The forward pass saves one array for all four, ``w = (r - u) + 2 k``: the rounding residual (in [-1/2, 1/2]; 0
  where clipped below, and within rounding of 0 above) plus twice the side ``k`` (-1 below the range, +1 above, 0
  inside). Then ``round(w) = 2 k`` and ``round(w^2) = 4 k^2`` exactly, and the three sums onto the range are

      sum(g round(w)) = 2 (S_above - S_below)     sum(g round(w^2)) = 4 (S_above + S_below)
      sum(g w) - sum(g round(w)) = sum(g (r - u))

  Why: on XLA:CPU a sum whose input holds a comparison or a select is an element-wise pass that writes a full-size
  array and then a library reduction (YNNPACK) that reads it, and XLA recomputes the producer of ``g`` (a depthwise
  layer's 9-tap backward pass) inside each such pass; products of ``g`` with ``round(w)``, ``round(w * w)`` and ``w``
  fuse into the reduction itself. On MobileNet v2's largest activation (batch 32) the forward and backward pass of
  this quantizer alone took 128-134 ms with three masks and 92-96 ms written this way; the whole threshold gradient
  of MobileNet v2 went from a median of 2.73-2.93 s to 1.73-1.94 s (docs/speed.md).
  """
  return _fake_quant_fwd(x, nmin, nmax, scale, offset)[0]


def _fake_quant_fwd(x, nmin, nmax, scale, offset):
  u = (jnp.clip(x, nmin, nmax) - nmin) / scale
  code = jnp.floor(u + 0.5)
  # |r - u| <= 1/2 holds in IEEE arithmetic (r - u is exact for u >= 1/2); the clip keeps the decoding of w (round(w)
  # is 0 inside the range) from resting on it
  side = jnp.where(x > nmax, 2.0, jnp.where(x < nmin, -2.0, 0.0)).astype(x.dtype)
  w = jnp.clip(code - u, -0.5, 0.5) + side
  return (code - offset) * scale, (w, nmin, nmax, scale, offset)


def _fake_quant_bwd(res, g):
  w, nmin, nmax, scale, offset = res
  # no subexpression of w is shared between the sums: XLA:CPU would write a shared one out as a full-size array
  difference = sum_to(g * jnp.round(w), nmin.shape) / 2  # S_above - S_below
  total = sum_to(g * jnp.round(w * w), nmin.shape) / 4  # S_above + S_below
  residual = sum_to(g * w, scale.shape) - 2 * difference  # sum of g (r - u) inside the range
  return (jnp.where(jnp.abs(w) > 1, jnp.zeros_like(g), g),
          (total - difference) / 2,
          (total + difference) / 2,
          residual,
          jnp.zeros_like(offset))


_fake_quant_nudged.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant_tangent(x: jax.Array, lo: jax.Array, hi: jax.Array, lo_dot: jax.Array, hi_dot: jax.Array,
                       num_bits: int, narrow_range: bool | jax.Array = False) -> jax.Array:
  """The straight-through derivative of ``fake_quant(x, lo, hi)`` along ``(lo_dot, hi_dot)``, ``x`` held fixed:
  with ``(nmin', nmax', scale')`` the derivative of the nudged range (``jax.jvp`` of :func:`nudge`),

      y' = nmin' below the range,   nmax' above it,   + (r - u) scale'   (the rounding residual, clipped to 1/2)

  term by term what :func:`fake_quant`'s backward pass sums (``r - u`` is exactly 0 below and within rounding of 0
  above). ``_fake_quant_nudged`` has a custom VJP, which ``jax.jvp`` cannot go through; this is its forward mode.
  """
  def nudged(lo, hi):
    p = nudge(lo, hi, num_bits, narrow_range)
    return p.nudged_min, p.nudged_max, p.scale

  (nmin, nmax, scale), (nmin_dot, nmax_dot, scale_dot) = jax.jvp(nudged, (lo, hi), (lo_dot, hi_dot))
  u = (jnp.clip(x, nmin, nmax) - nmin) / scale
  residual = jnp.clip(jnp.floor(u + 0.5) - u, -0.5, 0.5)
  return jnp.where(x < nmin, nmin_dot, jnp.where(x > nmax, nmax_dot, 0.0)) + residual * scale_dot


class Linearized(NamedTuple):
  """A fake-quantized tensor as a function of its range's factors, to first order:
  ``value + sum_i probes[i] * directions[i]``.

  ``value`` is the tensor with the factors held fixed, ``directions[i]`` its derivative along factor ``i`` (all of
  that factor's entries moved by 1: :func:`fake_quant_tangent`) and ``probes[i] = f_i - stop_gradient(f_i)``, zero
  in value with gradient 1 to the factor. The value is exact and so is the gradient, where each entry of a factor
  moves only its own slice of the tensor (one factor per tensor, or per channel along the axis the probes
  broadcast on). A layer that consumes a tensor this way can compute the factors' gradient without the tensor's own
  (``fatq.layers`` does, for depthwise kernels: the kernel's gradient is what is slow there)."""

  value: jax.Array
  directions: tuple[jax.Array, ...]
  probes: tuple[jax.Array, ...]

  def dense(self) -> jax.Array:
    """The tensor, with its gradient to the factors, as a plain array."""
    return sum((p * d for p, d in zip(self.probes, self.directions)), self.value)


def sum_to(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sum ``t`` over the axes along which an array of ``shape`` was broadcast to ``t.shape``."""
  lead = t.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and t.shape[lead + i] != 1)
  return jnp.sum(t, axis=axes).reshape(shape) if axes else t.reshape(shape)


def quantize(x: jax.Array, params: QuantParams) -> jax.Array:
  """The integer codes of ``x`` on the unsigned grid (no gradient); int8 codes are these minus 128. The division is
  correctly rounded (:func:`exact_divide`): the same codes as numpy's, also at near-ties."""
  clamped = jnp.clip(x, params.nudged_min, params.nudged_max)
  return jnp.floor(exact_divide(clamped - params.nudged_min, params.scale) + 0.5) + params.qmin


def clip_errors(error: Callable[[jax.Array], jax.Array], candidates: jax.Array) -> jax.Array:
  """``error(a)`` for each clipping factor ``a`` of ``candidates``, stacked: shape ``(len(candidates), *slices)``.

  ``error(a)`` gives the squared error ``sum (Q_a(x) - x)^2`` of each slice (a scalar per tensor, a vector per
  channel) on the grid whose range is the calibrated one scaled by ``a``. A sequential map, not a batch: memory stays
  that of one fake-quantized copy of the tensor."""
  return jax.lax.map(error, candidates)


def mse_clip(errors: jax.Array, candidates: jax.Array) -> jax.Array:
  """The clipping factor of least quantization error, per slice: ``alpha* = argmin_{a in candidates} errors[a]``,
  ``errors`` as :func:`clip_errors` gives them (summed over calibration batches for activations). The first of equal
  errors wins, so listing 1.0 first keeps the full range on ties."""
  return jnp.asarray(candidates)[jnp.argmin(errors, axis=0)]


HISTOGRAM_BINS = 2048


def histogram(values: jax.Array, lo: jax.Array, hi: jax.Array, bins: int = HISTOGRAM_BINS) -> jax.Array:
  """Counts of ``values`` (shape ``(n, *slices)``) in ``bins`` equal bins over ``[lo, hi]`` (shape ``slices``), per
  slice: shape ``(*slices, bins)``, float32. Value ``v`` is counted in bin ``floor((v - lo) / (hi - lo) * bins)``,
  clipped to ``[0, bins - 1]``, so ``hi`` itself falls in the last bin."""
  width = jnp.where(hi > lo, hi - lo, 1.0)
  index = jnp.clip(jnp.floor((values - lo) / width * bins), 0, bins - 1).astype(jnp.int32)
  slices = int(np.prod(jnp.shape(lo)))
  index = index.reshape(index.shape[0], slices) + jnp.arange(slices, dtype=jnp.int32) * bins
  counts = jnp.bincount(index.ravel(), length=slices * bins)
  return counts.reshape(*jnp.shape(lo), bins).astype(jnp.float32)


def histogram_quantile(counts: jax.Array, lo: jax.Array, hi: jax.Array, q: float) -> jax.Array:
  """The ``q``-quantile of the values :func:`histogram` counted on ``[lo, hi]``, rounded up to a bin edge, per slice:
  ``lo + (k + 1) (hi - lo) / bins`` for the first bin ``k`` whose cumulative count reaches ``q`` of the total
  (``q = 1``: the last non-empty bin's upper edge, ``hi`` for the values' own range).

  Counted from the top: the first ``k`` whose count above it, ``sum_{j > k} counts_j``, is at most ``(1 - q)`` of the
  total. Those tail sums are small, so float32 keeps them exact; a running sum from the bottom passes 2^24 on a large
  calibration set (MobileNet at 224 px: ~1e8 values per tensor), and then a bin of a few values added nothing."""
  from_top = jnp.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]  # sum_{j >= k}
  above = jnp.concatenate([from_top[..., 1:], jnp.zeros_like(from_top[..., :1])], axis=-1)
  k = jnp.argmax(above <= (1 - q) * from_top[..., :1], axis=-1)
  return lo + (k + 1) * (hi - lo) / counts.shape[-1]


def percentile_range(counts: jax.Array, t_left: jax.Array, t_right: jax.Array, percentile: float,
                     symmetric: bool) -> tuple[jax.Array, jax.Array]:
  """The range ``(t_left', t_right')`` that keeps ``percentile`` % of the calibration values, from their histogram
  over the min/max range ``[t_left, t_right]``, per slice (``p = percentile / 100``):

    symmetric grids, ``counts`` of ``|x|`` on ``[0, T_max]``, ``T_max = max(|t_left|, |t_right|)``:
      ``alpha (t_left, t_right)`` with ``alpha = Q_|x|(p) / T_max``;
    asymmetric grids, ``counts`` of ``x`` on ``[t_left, t_right]``:
      ``(Q_x((1 - p) / 2), Q_x((1 + p) / 2))``, a tail of ``(1 - p) / 2`` clipped on each side.

  Quantiles are rounded outwards to the histogram's bin edges, so ``p = 1`` gives back the min/max range."""
  p = percentile / 100.0
  if symmetric:
    t_max = jnp.maximum(jnp.abs(t_left), jnp.abs(t_right))
    alpha = jnp.where(t_max > 0, histogram_quantile(counts, 0.0, t_max, p) / jnp.where(t_max > 0, t_max, 1.0), 1.0)
    return alpha * t_left, alpha * t_right
  upper = histogram_quantile(counts, t_left, t_right, (1 + p) / 2)
  lower = -histogram_quantile(counts[..., ::-1], -t_right, -t_left, (1 + p) / 2)  # the same, on -x
  return lower, upper


def entropy_divergences(counts: jax.Array, lo: jax.Array, hi: jax.Array, candidates: jax.Array,
                        levels: jax.Array | int, eps: float = 1e-6) -> jax.Array:
  """For each clipping factor ``a`` of ``candidates``, the Kullback-Leibler divergence ``KL(P_a || Q_a)`` between the
  values :func:`histogram` counted on ``[lo, hi]`` clipped to ``a [lo, hi]``, and the same quantized to ``levels``
  steps (NVIDIA's TensorRT entropy calibration, Migacz 2017), per slice: shape ``(len(candidates), *slices)``.

  ``a [lo, hi]`` covers the bins ``[i, j) = [round((1 - a) z), round(z + a (bins - z)))``, ``z = -lo / (hi - lo)
  bins`` the bin position of 0 (``lo = 0``: the first ``a bins`` bins). ``P_a``: those counts, the clipped ones
  added to the first and last bins of the window. ``Q_a``: the window's counts (without them) merged into ``levels``
  groups of consecutive bins, bin ``k`` in group ``floor((k - i) levels / (j - i))``, each group's total spread
  evenly over its non-empty bins, as a uniform grid of ``levels`` steps over the window would. Both are normalized;
  a bin that ``Q_a`` leaves empty where ``P_a`` has mass counts as ``eps``, so that clipping at an empty bin costs
  much, not infinitely much. A window of fewer bins than ``levels`` quantizes nothing (``Q_a`` then equals ``P_a``
  but for the clipped tails).

  The bin that holds 0 counts as its neighbour does (the next bin up; NVIDIA's pytorch-quantization: ``bins[0] =
  bins[1]``): 0 is on every grid, so the point mass of a ReLU's zeros is quantized without error, but spread over
  its group by ``Q_a`` it would dominate the divergence, which would then favour the narrowest window (measured on
  MobileNet v1 at W8A8: 39.7 % top-1, against 77.3 % with min/max ranges)."""
  bins = counts.shape[-1]
  flat = counts.reshape(-1, bins)
  rows = flat.shape[0]
  width = jnp.where(hi > lo, hi - lo, 1.0).reshape(-1, 1)
  zero = jnp.clip(-jnp.reshape(lo, (-1, 1)) / width * bins, 0, bins)
  levels = jnp.broadcast_to(jnp.asarray(levels, jnp.int32), jnp.shape(lo)).reshape(-1, 1)
  k = jnp.arange(bins, dtype=jnp.int32)
  at_zero = jnp.minimum(jnp.floor(zero), bins - 1).astype(jnp.int32)
  neighbour = jnp.where(at_zero + 1 < bins, at_zero + 1, at_zero - 1)
  flat = jnp.where(k == at_zero, jnp.take_along_axis(flat, neighbour, -1), flat)

  def divergence(alpha):
    start = jnp.clip(jnp.round((1 - alpha) * zero), 0, bins - 1).astype(jnp.int32)
    stop = jnp.clip(jnp.round(zero + alpha * (bins - zero)).astype(jnp.int32), start + 1, bins)
    inside = (k >= start) & (k < stop)
    window = jnp.where(inside, flat, 0.0)
    clipped_low = jnp.sum(jnp.where(k < start, flat, 0.0), -1, keepdims=True)
    clipped_high = jnp.sum(jnp.where(k >= stop, flat, 0.0), -1, keepdims=True)
    p = window + jnp.where(k == start, clipped_low, 0.0) + jnp.where(k == stop - 1, clipped_high, 0.0)
    # Q: each group's total over its non-empty bins (segment sums: exact where cumulative float32 sums are not)
    n = stop - start
    group = jnp.clip(k - start, 0, n - 1) * jnp.minimum(levels, n) // n + jnp.arange(rows)[:, None] * bins
    sums = lambda v: jax.ops.segment_sum(v.ravel(), group.ravel(), rows * bins)[group]
    q = jnp.where(inside & (flat > 0), sums(window) / jnp.maximum(sums((window > 0).astype(jnp.float32)), 1.0), 0.0)
    p, q = (v / jnp.maximum(jnp.sum(v, -1, keepdims=True), 1e-30) for v in (p, q))  # an empty slice: 0 for all
    terms = jnp.where(p > 0, p * jnp.log(p / jnp.where(q > 0, q, eps)), 0.0)
    return jnp.sum(terms, -1).reshape(jnp.shape(lo))

  return jax.lax.map(divergence, jnp.asarray(candidates, jnp.float32))


# ---------------------------------------------------------------------------------------------------------------------
# FAT threshold parameterisations.


def symmetric_range(alpha: jax.Array, t_max: jax.Array, signed: jax.Array | bool,
                    bounds: tuple[float, float] = (0.5, 1.0)) -> tuple[jax.Array, jax.Array]:
  """FAT symmetric threshold: ``T = clip(alpha, a, b) * T_max``; range ``[-T, T]`` if signed else ``[0, T]``.

  Signed ranges are used with ``narrow_range=True`` (grid ``[-(2^(n-1)-1), 2^(n-1)-1]``, zero point exactly 0);
  unsigned ranges use the full grid ``[0, 2^n - 1]``.
  """
  t = bounded(alpha, *bounds) * t_max
  return jnp.where(signed, -t, jnp.zeros_like(t)), t


def asymmetric_range(shift: jax.Array, width: jax.Array, t_left: jax.Array, t_right: jax.Array,
                     shift_bounds: tuple[jax.Array | float, jax.Array | float] = (-0.2, 0.4),
                     width_bounds: tuple[float, float] = (0.5, 1.0)) -> tuple[jax.Array, jax.Array]:
  """FAT asymmetric thresholds, left limit and width:

      R      = T_r - T_l
      T_l'   = T_l + clip(alpha_T, a_min, a_max) * R
      R'     = clip(alpha_R, r_min, r_max) * R
      range  = [T_l', T_l' + R']

  The paper uses shift bounds ``[-0.2, 0.4]`` for signed tensors and ``[0, 0.4]`` for unsigned ones, width ``[0.5,
  1.0]``; the reference code uses width ``[0.5, 1.3]`` and no shift for unsigned tensors. ``nudge`` later puts 0 back
  into the range if a shift moved it out (keeping the width), so training and the exported model agree. So the
  paper's unsigned shift cannot change the output: a range that starts at 0, shifted right, is moved back to start
  at 0. The factor exists, as in the paper, but only the width of an unsigned tensor matters.
  """
  r = t_right - t_left
  # XLA may fuse a * b + c into one multiply-add in one compiled program and not in another (measured: a MobileNet v1
  # output scale 1 ulp apart); exact agreement with an exported file goes through the file's grids (docs/export.md).
  lo = t_left + bounded(shift, *shift_bounds) * r
  return lo, lo + bounded(width, *width_bounds) * r


def quantize_bias(bias: jax.Array, input_scale: jax.Array, weight_scale: jax.Array) -> jax.Array:
  """TFLite int32 bias: ``b_q = clip(round(b / (s_in * s_w)), -(2^31-1), 2^31-1)`` with scale ``s_in * s_w``.

  Returns the integer codes (as int32); multiply by ``input_scale * weight_scale`` for the dequantized bias.
  """
  codes = jnp.round(bias / (input_scale * weight_scale))
  # 2^31 - 1 is no float32 (a float32 clip to it gives 2^31, which int32 cannot hold): saturate after the cast
  largest = float(np.nextafter(np.float32(2**31), np.float32(0)))
  inside = jnp.clip(codes, -largest, largest).astype(jnp.int32)
  return jnp.where(codes >= 2.0**31, INT32_MAX, jnp.where(codes <= -(2.0**31), -INT32_MAX, inside))
