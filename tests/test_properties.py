"""Property-based tests of the quantization core (fatq.quantizers) and of FakeQuant's gradients.

For random shapes, bit widths 2..16, symmetric / asymmetric, per-tensor / per-channel, narrow / full ranges and
random inputs: outputs lie on the nudged grid and inside it, 0 maps to exactly 0, the error inside the range is at
most half a step, quantizing twice changes nothing, and every gradient (input, range ends, FAT factors) is finite.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from fatq import quantizers as Q
from fatq.config import QuantSpec
from fatq.layers import RANGES, STATS, THRESHOLDS, FakeQuant

EPS = float(np.finfo(np.float32).eps)
# Eager JAX compiles every operation once per shape: shapes come from a short list (ranks 1 to 4, channel counts
# 1 to 5) so that compiled operations are reused across examples, which keeps the file under ~30 s.
SHAPES = [(1,), (7,), (3, 5), (4, 1), (2, 3, 4), (2, 2, 3, 2)]
# FATQ_PROPERTY_EXAMPLES=1000 explores further than the default run (the file took ~30 s here).
SETTINGS = settings(max_examples=int(os.environ.get("FATQ_PROPERTY_EXAMPLES", 30)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
# Properties checked under jit compile once per example (the bit width and the shapes are static): fewer examples.
JIT_SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])

bits_st = st.integers(2, 16)


def _fl(lo: float, hi: float):
  """float32 values in [lo, hi] (bounds rounded to float32, which hypothesis requires), no subnormals."""
  return st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32, allow_subnormal=False)


def _floats(bound: float):
  return _fl(-bound, bound)


magnitude = _fl(1e-3, 1e3)


@st.composite
def tensor_and_ranges(draw, per_channel=None):
  """``(x, lo, hi)``: x of a random shape with values around the range; lo/hi scalars or per-channel vectors (last
  axis) with lo <= hi, some ranges excluding 0, some degenerate (lo == hi, an all-zero channel)."""
  shape = draw(st.sampled_from(SHAPES))
  per_channel = draw(st.booleans()) if per_channel is None else per_channel
  n = shape[-1] if per_channel else 1
  ends = draw(hnp.arrays(np.float32, (2, n), elements=_floats(1e3)))
  scale = draw(magnitude)
  ends = np.sort(ends, axis=0)
  if draw(st.booleans()):  # keep most ranges at a sane width relative to their position
    ends = np.stack([ends[0] / 1e3 * scale, ends[1] / 1e3 * scale]).astype(np.float32)
  lo, hi = ends[0], ends[1]
  reach = float(max(np.abs(lo).max(), np.abs(hi).max(), 1e-3)) * 1.5
  x = draw(hnp.arrays(np.float32, shape, elements=_floats(reach)))
  x.flat[0] = 0.0  # zero must survive exactly
  if not per_channel:
    lo, hi = lo[0], hi[0]
  return x, np.float32(lo) if lo.ndim == 0 else lo, np.float32(hi) if hi.ndim == 0 else hi


def _grid_checks(x, y, p: Q.QuantParams, exact_zero: bool = True):
  """y lies on ``nudged_min + k * scale`` (k integer in [0, qmax - qmin]), within [nudged_min, nudged_max]; zero is
  exact (``exact_zero``; else within float32 rounding, see test_zero_is_exact_under_jit); inside the range the error
  is at most scale / 2 (up to float32 rounding)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  scale, nmin, nmax = (np.broadcast_to(np.asarray(v, np.float64), x.shape)
                       for v in (p.scale, p.nudged_min, p.nudged_max))
  levels = float(p.qmax - np.max(p.qmin))
  assert np.all(np.isfinite(y))
  span = np.maximum(np.abs(nmin), np.abs(nmax))
  # float32 rounding of x / scale and of k * scale + nudged_min: a few ulps of the range's magnitude
  slack = 8 * EPS * np.maximum(span, np.abs(x))
  k = (y - nmin) / scale
  np.testing.assert_allclose(k, np.round(k), atol=1e-4 + 8 * EPS * levels)
  assert np.all(np.round(k) >= 0) and np.all(np.round(k) <= levels)
  assert np.all(y >= nmin - slack) and np.all(y <= nmax + slack)
  if exact_zero:
    assert np.all(y[x == 0] == 0.0)
  else:
    assert np.all(np.abs(y[x == 0]) <= 4 * EPS * span[x == 0])
  inside = (x >= nmin) & (x <= nmax)
  assert np.all(np.abs(y - x)[inside] <= scale[inside] / 2 + slack[inside])
  # outside: clamped to the nearer end
  np.testing.assert_allclose(y[x < nmin], nmin[x < nmin], rtol=1e-6, atol=slack.max() if slack.size else 0)
  np.testing.assert_allclose(y[x > nmax], nmax[x > nmax], rtol=1e-6, atol=slack.max() if slack.size else 0)


@SETTINGS
@given(tensor_and_ranges(), bits_st, st.booleans())
def test_fake_quant_grid_range_zero_error_idempotent(data, bits, narrow):
  x, lo, hi = data
  p = Q.nudge(jnp.asarray(lo), jnp.asarray(hi), bits, narrow)
  y = Q.fake_quant(jnp.asarray(x), lo, hi, bits, narrow)
  assert y.shape == x.shape
  _grid_checks(x, y, p)
  assert np.all(np.asarray(p.scale) > 0)
  zp = np.asarray(p.zero_point)
  np.testing.assert_array_equal(zp, np.round(zp))
  assert np.all(zp >= p.qmin) and np.all(zp <= p.qmax)
  assert float(np.max(np.asarray(p.nudged_min))) <= 0.0 <= float(np.min(np.asarray(p.nudged_max)))
  twice = Q.fake_quant(y, lo, hi, bits, narrow)
  span = float(np.max(np.maximum(np.abs(p.nudged_min), np.abs(p.nudged_max))))
  np.testing.assert_allclose(np.asarray(twice), np.asarray(y), rtol=0, atol=8 * EPS * span)


@SETTINGS
@given(tensor_and_ranges(), bits_st, st.booleans())
# every value on a rounding tie: 0.4 / (0.8 / 3) = 1.5 (found by hypothesis in a CI run)
@example((np.array([0.0] + [0.4] * 6, np.float32), np.float32(0.0), np.float32(0.8)), 2, False)
def test_quantize_codes_are_integers_that_dequantize_to_fake_quant(data, bits, narrow):
  x, lo, hi = data
  p = Q.nudge(jnp.asarray(lo), jnp.asarray(hi), bits, narrow)
  codes = np.asarray(Q.quantize(jnp.asarray(x), p))
  np.testing.assert_array_equal(codes, np.round(codes))
  assert codes.min() >= np.min(p.qmin) and codes.max() <= p.qmax
  scale = np.asarray(p.scale, np.float64)
  deq = (codes - np.asarray(p.zero_point, np.float64)) * scale
  y = np.asarray(Q.fake_quant(jnp.asarray(x), lo, hi, bits, narrow), np.float64)
  span = float(np.max(np.maximum(np.abs(p.nudged_min), np.abs(p.nudged_max))))
  # The same value up to float32 error, except on a rounding tie, where the two float32 computations may round to
  # the neighbouring codes: then one step apart, and only there.
  off = np.abs(deq - y) > 8 * EPS * span + 1e-12
  v = x.astype(np.float64) / scale  # position on the grid, in steps
  near_tie = np.abs(np.abs(v - np.floor(v)) - 0.5) <= 8 * EPS * (np.abs(v) + 1)
  assert np.all(near_tie[off]), f"off the tie points: x = {x[off & ~near_tie]}"
  assert np.all(np.abs(deq - y) <= np.broadcast_to(scale, y.shape) * 1.001 + 8 * EPS * span)


# Under jit XLA:CPU would fuse code * scale + nudged_min into one multiply-add (0 came out 2.98e-8); fake_quant
# computes (code - zero point) * scale as TFLite dequantizes.
def test_zero_is_exact_under_jit():
  f = jax.jit(lambda x, lo, hi: Q.fake_quant(x, lo, hi, 2))
  assert float(f(jnp.float32(0.0), jnp.float32(-1.0), jnp.float32(0.0))) == 0.0  # 2.98e-8 on XLA:CPU
  rng = np.random.default_rng(0)
  lo, hi = -rng.uniform(0, 10, 100).astype(np.float32), rng.uniform(0, 10, 100).astype(np.float32)
  g = jax.jit(lambda lo, hi: Q.fake_quant(jnp.zeros_like(lo), lo, hi, 8, False))
  np.testing.assert_array_equal(np.asarray(g(lo, hi)), 0.0)


# Gradients are taken under jit (one compilation per example, and cached for a repeated configuration): eager
# jax.grad recompiles every operation of every call.


@functools.partial(jax.jit, static_argnames=("bits", "narrow"))
def _fake_quant_grads(x, lo, hi, bits, narrow):
  def loss(x, lo, hi):
    return jnp.sum(jnp.square(Q.fake_quant(x, lo, hi, bits, narrow) - 0.3 * x))

  dy = jax.grad(lambda x: jnp.sum(Q.fake_quant(x, lo, hi, bits, narrow)))(x)
  return jax.grad(loss, argnums=(0, 1, 2))(x, lo, hi), dy


@JIT_SETTINGS
@given(tensor_and_ranges(), bits_st, st.booleans())
def test_gradients_wrt_input_and_range_are_finite_and_ste(data, bits, narrow):
  x, lo, hi = data
  grads, dy = _fake_quant_grads(jnp.asarray(x), jnp.asarray(lo), jnp.asarray(hi), bits, narrow)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  # straight-through: d y / d x is 1 inside the closed nudged range (up to the float32 rounding of (1 / scale) *
  # scale) and exactly 0 outside
  p = Q.nudge(jnp.asarray(lo), jnp.asarray(hi), bits, narrow)
  inside = (x >= np.asarray(p.nudged_min)) & (x <= np.asarray(p.nudged_max))
  np.testing.assert_allclose(np.asarray(dy), inside.astype(np.float32), rtol=4 * EPS, atol=0)


@jax.jit
def _ste_and_bounded(x, lo, hi):
  return (Q.ste_round(x), jax.grad(lambda v: jnp.sum(Q.ste_round(v)))(x),
          Q.bounded(x, lo, hi), jax.grad(lambda v: jnp.sum(Q.bounded(v, lo, hi)))(x))


@SETTINGS
@given(hnp.arrays(np.float32, st.sampled_from(SHAPES), elements=_floats(1e4)), _floats(10), _fl(0, 10))
def test_ste_round_and_bounded(x, lo, width):
  hi = np.float32(lo + width)
  r, dr, b, db = map(np.asarray, _ste_and_bounded(jnp.asarray(x), lo, hi))
  np.testing.assert_array_equal(r, np.floor(x + np.float32(0.5)))
  np.testing.assert_array_equal(dr, 1.0)
  np.testing.assert_array_equal(b, np.clip(x, lo, hi))
  np.testing.assert_array_equal(db, ((x >= lo) & (x <= hi)).astype(np.float32))  # the closed interval passes


@functools.partial(jax.jit, static_argnames=("bits", "signed", "bounds"))
def _symmetric_case(alpha, t_max, x, bits, signed, bounds):
  def out(alpha, x):
    lo, hi = Q.symmetric_range(alpha, t_max, signed, bounds)
    return Q.fake_quant(x, lo, hi, bits, signed)

  grads = jax.grad(lambda a, v: jnp.sum(jnp.square(out(a, v) - v)), argnums=(0, 1))(alpha, x)
  return out(alpha, x), Q.symmetric_range(alpha, t_max, signed, bounds), grads


@JIT_SETTINGS
@given(st.data(), bits_st, st.booleans(), st.sampled_from([(0.5, 1.0), (0.5, 1.3)]))
def test_symmetric_fat_range(data, bits, signed, bounds):
  """``T = clip(alpha) * T_max``: signed grids are narrow with zero point exactly at the middle; the factor's gradient
  is finite, and 0 when alpha is beyond its bounds."""
  x, _, _ = data.draw(tensor_and_ranges())
  per_channel = data.draw(st.booleans())
  n = x.shape[-1] if per_channel else ()
  t_max = data.draw(hnp.arrays(np.float32, n, elements=_fl(0, 1e3)))  # 0: an all-zero channel
  alpha = data.draw(hnp.arrays(np.float32, n, elements=_fl(0.2, 1.6)))
  y, (lo, hi), (ga, gx) = _symmetric_case(jnp.asarray(alpha), jnp.asarray(t_max), jnp.asarray(x), bits, signed,
                                          bounds)
  p = Q.nudge(lo, hi, bits, signed)
  _grid_checks(x, y, p, exact_zero=False)
  # Zero point exactly in the middle (int8 zero point 0) or at the bottom of the grid. Not for a dead range
  # (T ~ 0, an all-zero channel), which nudge widens to [0, 1e-8]; fatq.export gives those zero point 0 itself.
  live = np.broadcast_to(np.asarray(hi) - np.asarray(lo) > 1e-8, np.shape(p.zero_point))
  np.testing.assert_array_equal(np.asarray(p.zero_point)[live], 2 ** (bits - 1) if signed else 0)
  assert np.all(np.isfinite(np.asarray(ga))) and np.all(np.isfinite(np.asarray(gx)))
  outside = (alpha < bounds[0]) | (alpha > bounds[1])
  assert np.all(np.asarray(ga)[outside] == 0.0)


@functools.partial(jax.jit, static_argnames=("bits", "shift_bounds", "width_bounds"))
def _asymmetric_case(shift, width, t_left, t_right, x, bits, shift_bounds, width_bounds):
  def out(shift, width, x):
    lo, hi = Q.asymmetric_range(shift, width, t_left, t_right, shift_bounds, width_bounds)
    return Q.fake_quant(x, lo, hi, bits)

  grads = jax.grad(lambda s, w, v: jnp.sum(jnp.square(out(s, w, v) - v)), argnums=(0, 1, 2))(shift, width, x)
  return out(shift, width, x), Q.asymmetric_range(shift, width, t_left, t_right, shift_bounds, width_bounds), grads


@JIT_SETTINGS
@given(st.data(), bits_st, st.booleans(), st.sampled_from([(0.5, 1.0), (0.5, 1.3)]))
def test_asymmetric_fat_range(data, bits, signed, width_bounds):
  """``T_l' = T_l + clip(alpha_T) R``, ``R' = clip(alpha_R) R``: on the grid after nudging (which puts 0 back into a
  shifted range), with finite gradients for both factors, 0 for a factor beyond its bounds."""
  x, t_left, t_right = data.draw(tensor_and_ranges())
  shape = np.shape(t_left)
  shift = data.draw(hnp.arrays(np.float32, shape, elements=_fl(-0.5, 0.7)))
  width = data.draw(hnp.arrays(np.float32, shape, elements=_fl(0.2, 1.6)))
  shift_bounds = (-0.2, 0.4) if signed else (0.0, 0.4)
  y, (lo, hi), grads = _asymmetric_case(*map(jnp.asarray, (shift, width, t_left, t_right, x)), bits, shift_bounds,
                                        width_bounds)
  assert np.all(np.asarray(hi) >= np.asarray(lo))
  _grid_checks(x, y, Q.nudge(lo, hi, bits), exact_zero=False)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  for factor, (low, high), g in ((shift, shift_bounds, grads[0]), (width, width_bounds, grads[1])):
    outside = (factor < np.float32(low)) | (factor > np.float32(high))  # the bounds as JAX compares them, in float32
    assert np.all(np.asarray(g)[outside] == 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _module_case(spec, x, delta):
  """Calibrate a FakeQuant on x, create its FAT factors, move them by delta, quantize x; the recorded range and the
  gradients w.r.t. factors and input."""
  fq = FakeQuant(spec)
  stats = fq.apply({}, x, mutable=[STATS])[1][STATS]
  factors = fq.apply({STATS: stats}, x, mutable=[THRESHOLDS])[1][THRESHOLDS]
  factors = jax.tree.map(lambda f: f + delta, factors)

  def apply(f, v):
    return fq.apply({STATS: stats, THRESHOLDS: f}, v, mutable=[RANGES])

  y, ranges = apply(factors, x)
  grads = jax.grad(lambda f, v: jnp.sum(jnp.square(apply(f, v)[0] - v)), argnums=(0, 1))(factors, x)
  return y, ranges[RANGES], grads


@settings(JIT_SETTINGS, max_examples=8)  # a whole flax module per compilation
@given(st.data(), bits_st, st.booleans(), st.booleans(), st.sampled_from([None, True, False]))
def test_fake_quant_module_calibrated_output_and_factor_gradients(data, bits, symmetric, per_channel, signed):
  """FakeQuant as the models use it: calibrate on x, create the FAT factors, quantize; the output is on the grid of
  the range FakeQuant records, and gradients w.r.t. the factors and the input are finite."""
  shape = data.draw(st.sampled_from(SHAPES[2:]))
  x = data.draw(hnp.arrays(np.float32, shape, elements=_floats(100)))
  axis = data.draw(st.integers(-len(shape), len(shape) - 1))
  keep = (shape[axis],) if per_channel else ()
  delta = data.draw(hnp.arrays(np.float32, keep, elements=_fl(-0.6, 0.6)))  # some factors beyond their bounds
  spec = QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, channel_axis=axis, signed=signed)
  y, r, (gf, gx) = _module_case(spec, jnp.asarray(x), jnp.asarray(delta))
  assert set(gf) == ({"scale"} if symmetric else {"shift", "width"})
  bshape = [1] * x.ndim
  if per_channel:
    bshape[axis % x.ndim] = -1
  p = Q.QuantParams(np.asarray(r["scale"]).reshape(bshape), np.asarray(r["zero_point"]).reshape(bshape),
                    np.asarray(r["qmin"]), int(r["qmax"]))
  assert int(r["qmax"]) == 2**bits - 1
  _grid_checks(x, y, p, exact_zero=False)
  for g in jax.tree.leaves((gf, gx)):
    assert np.all(np.isfinite(np.asarray(g)))
  # a factor moved beyond its bounds (the spec's; the shift's as the grid's signedness, chosen from the data) is clipped:
  # zero gradient there. Compared in float32, as JAX compares.
  grid_signed = x.min() < 0 if signed is None else signed
  bounds = dict(scale=spec.scale_bounds, width=spec.scale_bounds,
                shift=spec.signed_shift_bounds if grid_signed else spec.unsigned_shift_bounds)
  for name, g in gf.items():
    factor = np.float32(0.0 if name == "shift" else 1.0) + delta
    outside = (factor < np.float32(bounds[name][0])) | (factor > np.float32(bounds[name][1]))
    assert np.all(np.asarray(g)[outside] == 0.0), name
