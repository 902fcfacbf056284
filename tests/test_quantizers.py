"""The quantization core against its formulas, TensorFlow's fake-quant kernel and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fatq import quantizers as Q
from fatq import quantizers

jax.config.update("jax_enable_x64", False)


def _tf():
  return pytest.importorskip("tensorflow")


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (0.0, 6.0), (-0.3, 2.7), (-5.0, -0.0), (0.2, 0.9)])
def test_error_within_half_step_inside_range_and_zero_exact(bits, lo, hi):
  x = jnp.linspace(lo - 1, hi + 1, 4001)
  p = Q.nudge(jnp.float32(lo), jnp.float32(hi), bits)
  y = Q.fake_quant(x, jnp.float32(lo), jnp.float32(hi), bits)
  inside = (x >= p.nudged_min) & (x <= p.nudged_max)
  float_slack = 4 * np.finfo(np.float32).eps * max(abs(lo), abs(hi))  # float32 rounding of x / scale
  assert float(jnp.max(jnp.abs(y - x)[inside])) <= float(p.scale) / 2 + float_slack
  # outside: clamped to the nudged ends
  np.testing.assert_allclose(y[x < p.nudged_min], p.nudged_min, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(y[x > p.nudged_max], p.nudged_max, rtol=1e-6, atol=1e-7)
  assert float(Q.fake_quant(jnp.float32(0.0), lo, hi, bits)) == 0.0  # zero exactly representable
  # the output lies on the grid: (y / scale) + zero_point is an integer in [qmin, qmax]
  codes = np.asarray(y / p.scale + p.zero_point)
  tol = 1e-3 + 1e-6 * p.qmax  # float32 resolution of large codes
  np.testing.assert_allclose(codes, np.round(codes), atol=tol)
  assert codes.min() >= p.qmin - tol and codes.max() <= p.qmax + tol


@pytest.mark.parametrize("narrow", [False, True])
def test_idempotent(narrow):
  x = jax.random.normal(jax.random.key(0), (1000,)) * 2
  y = Q.fake_quant(x, -1.5, 2.5, 8, narrow)
  np.testing.assert_allclose(Q.fake_quant(y, -1.5, 2.5, 8, narrow), y, atol=1e-6)


def test_symmetric_signed_narrow_grid_has_zero_point_zero():
  t = jnp.float32(0.77)
  lo, hi = Q.symmetric_range(jnp.float32(1.0), t, True)
  p = Q.nudge(lo, hi, 8, narrow_range=True)
  assert float(p.zero_point) == 128.0  # int8 zero point 0
  np.testing.assert_allclose(float(p.scale), 0.77 / 127, rtol=1e-6)
  np.testing.assert_allclose([float(p.nudged_min), float(p.nudged_max)], [-0.77, 0.77], rtol=1e-6)


def test_per_channel_ranges_broadcast():
  x = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  t = jnp.max(jnp.abs(x), axis=(0, 1, 2))
  y = Q.fake_quant(x, -t, t, 4, True)
  assert y.shape == x.shape
  for c in range(5):
    np.testing.assert_allclose(y[..., c], Q.fake_quant(x[..., c], -t[c], t[c], 4, True), atol=1e-6)
    assert len(np.unique(np.asarray(y[..., c]))) <= 15  # 4-bit narrow grid: 15 levels


@pytest.mark.parametrize("bits,narrow", [(8, False), (8, True), (4, False), (3, True), (16, False)])
@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (0.0, 6.0), (-0.3, 2.7), (0.1, 0.9), (-2.0, -0.5)])
def test_equals_tensorflow_fake_quant(bits, narrow, lo, hi):
  tf = _tf()
  x = np.random.default_rng(0).uniform(lo - 1, hi + 1, 5000).astype(np.float32)
  ours = np.asarray(Q.fake_quant(jnp.asarray(x), jnp.float32(lo), jnp.float32(hi), bits, narrow))
  ref = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=bits, narrow_range=narrow).numpy()
  p = Q.nudge(jnp.float32(lo), jnp.float32(hi), bits, narrow)
  # equal up to float rounding of a value that sits on a rounding boundary (at most one step, rarely, and only there)
  mismatch = np.abs(ours - ref) > 1e-5 * max(1.0, abs(hi))
  assert mismatch.mean() < 1e-3
  assert np.all(np.abs(ours - ref) <= float(p.scale) * 1.001)
  steps = (np.clip(x, p.nudged_min, p.nudged_max).astype(np.float64) - float(p.nudged_min)) / float(p.scale)
  near_tie = np.abs(steps - np.floor(steps) - 0.5) <= 8 * np.finfo(np.float32).eps * (steps + 1)
  assert np.all(near_tie[mismatch]), x[mismatch & ~near_tie]


def test_equals_tensorflow_per_channel():
  tf = _tf()
  x = np.random.default_rng(1).normal(size=(2, 3, 3, 6)).astype(np.float32)
  t = np.abs(x).max(axis=(0, 1, 2))
  ref = tf.quantization.fake_quant_with_min_max_vars_per_channel(x, -t, t, num_bits=8, narrow_range=True).numpy()
  ours = np.asarray(Q.fake_quant(jnp.asarray(x), -t, t, 8, True))
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_ste_gradient_wrt_input_is_one_inside_zero_outside():
  x = jnp.array([-3.0, -0.99, -0.2, 0.0, 0.33, 0.99, 3.0])
  g = jax.grad(lambda x: jnp.sum(Q.fake_quant(x, -1.0, 1.0, 4, True)))(x)
  np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 1, 1, 0])


def test_threshold_gradient_matches_hand_derivation():
  # symmetric narrow: out = s * clip(round(x / s), -L, L) with s = T / L, L = 2^(n-1) - 1.
  # inside: d out / dT = (round(x/s) - x/s) / L ; outside (x > T): d out / dT = 1.
  bits, L, T = 4, 7, 1.3
  x = jnp.array([0.1, -0.45, 0.77, 2.0, -5.0])

  def f(t):
    return Q.fake_quant(x, -t, t, bits, True)

  jac = jax.jacobian(f)(jnp.float32(T))
  s = T / L
  u = np.asarray(x) / s
  expected = np.where(np.abs(np.asarray(x)) <= T, (np.floor(u + 0.5) - u) / L, np.sign(np.asarray(x)))
  np.testing.assert_allclose(np.asarray(jac), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_hand_written_gradient_equals_the_formula(per_channel):
  # The STE gradient of floor((clip(x, nmin, nmax) - nmin) / scale + 0.5) * scale + nmin, evaluated directly: u and
  # the rounding residual r - u in float32 as the forward pass computes them, the sums in float64. (JAX's own
  # autodiff of the formula is further off: d(u * scale)/d scale = u - (c - nmin) / scale leaves ~ulp(u) per element.)
  # Values below, above and exactly at the ends of the range, and rounding ties (r - u = 1/2, also at u = 1/2 - 2^-25,
  # where u + 0.5 rounds up to 1): the backward pass decodes the one array it saves correctly at all of them.
  rng = np.random.default_rng(3)
  channels = 5
  scale = 2.0 ** np.arange(-2, 3, dtype=np.float32) if per_channel else np.full(channels, 1, np.float32)
  nmin = np.zeros(channels, np.float32)
  nmax = nmin + 255 * scale
  special = np.array([np.nextafter(np.float32(0.5), np.float32(0)), 0.5, 1.5, -2.5, 0.0], np.float32)
  x = np.concatenate([rng.normal(0, 150, (400, channels)).astype(np.float32), special[:, None] * scale, nmin[None],
                      nmax[None]])
  assert (x < nmin).any() and (x > nmax).any()
  g = rng.normal(size=x.shape).astype(np.float32)
  u = ((np.clip(x, nmin, nmax) - nmin) / scale).astype(np.float32)
  residual = (np.floor(u + np.float32(0.5)) - u).astype(np.float64)
  assert residual.max() == 0.5
  axis = 0 if per_channel else None
  expected = [np.where((x >= nmin) & (x <= nmax), g, 0), np.sum(np.where(x < nmin, g, 0.0), axis),
              np.sum(np.where(x > nmax, g, 0.0), axis), np.sum(g * residual, axis)]

  params = [jnp.asarray(v if per_channel else v[0]) for v in (nmin, nmax, scale)]
  offset = jnp.round(-params[0] / params[2])
  ours = jax.vjp(lambda *a: Q._fake_quant_nudged(*a, offset), jnp.asarray(x), *params)[1](jnp.asarray(g))
  np.testing.assert_array_equal(np.asarray(ours[0]), expected[0])
  for name, a, b in zip(["nmin", "nmax", "scale"], ours[1:], expected[1:]):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("narrow", [False, True])
def test_fake_quant_tangent_is_the_forward_mode_of_the_backward_pass(per_channel, narrow):
  # <g, tangent along (lo', hi')> = <vjp(g), (lo', hi')>, the pairing that defines a derivative, with the hand-written
  # backward pass as the VJP: a per-channel range moved channel by channel (each channel's tangent its own column)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(0, 1.5, (300, 4)).astype(np.float32))
  g = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  shape = (4,) if per_channel else ()
  lo = jnp.float32(-1.2) + (0.1 * jnp.arange(4.0) if per_channel else 0.0)
  hi = jnp.full(shape, 2.1, jnp.float32)
  lo_dot = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  hi_dot = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  tangent = Q.fake_quant_tangent(x, lo, hi, lo_dot, hi_dot, 4, narrow)
  assert ((x < lo) | (x > hi)).any()
  _, vjp = jax.vjp(lambda lo, hi: Q.fake_quant(x, lo, hi, 4, narrow), lo, hi)
  d_lo, d_hi = vjp(g)
  axis = 0 if per_channel else None
  np.testing.assert_allclose(np.sum(np.asarray(g * tangent), axis), d_lo * lo_dot + d_hi * hi_dot, rtol=1e-5,
                             atol=1e-5)
  # no move of the range, no move of the output
  np.testing.assert_array_equal(Q.fake_quant_tangent(x, lo, hi, jnp.zeros(shape), jnp.zeros(shape), 4, narrow), 0)


def test_linearized_value_and_gradient():
  # value + sum_i p_i d_i with p_i = f_i - stop_gradient(f_i): the same array as the dense tensor, and the gradient of
  # the factor through the direction
  x = jnp.linspace(-2, 2, 24).reshape(2, 3, 4)
  f = jnp.float32(0.7)

  def linearized(f):
    direction = Q.fake_quant_tangent(x, -f, f, -1.0, 1.0, 8, True)
    return Q.Linearized(Q.fake_quant(x, -jax.lax.stop_gradient(f), jax.lax.stop_gradient(f), 8, True), (direction,),
                        (f - jax.lax.stop_gradient(f),))

  np.testing.assert_array_equal(linearized(f).dense(), Q.fake_quant(x, -f, f, 8, True))
  g = jnp.cos(3 * x) + x  # an odd part: the gradient of a symmetric range to a symmetric loss would cancel
  np.testing.assert_allclose(jax.grad(lambda f: jnp.sum(g * linearized(f).dense()))(f),
                             jax.grad(lambda f: jnp.sum(g * Q.fake_quant(x, -f, f, 8, True)))(f), rtol=1e-5)


def test_threshold_gradient_matches_finite_differences_of_expected_loss():
  # The rounding makes the loss piecewise; on a dense sample its STE gradient matches the finite difference of a
  # smooth surrogate only in expectation. Check the clip part exactly: for x beyond T, the loss is smooth in T.
  x = jnp.array([1.5, 2.0, -3.0])

  def loss(t):
    return jnp.sum(jnp.square(Q.fake_quant(x, -t, t, 8, True) - x))

  t0, eps = 1.0, 1e-3
  fd = (loss(t0 + eps) - loss(t0 - eps)) / (2 * eps)
  np.testing.assert_allclose(float(jax.grad(loss)(jnp.float32(t0))), float(fd), rtol=1e-3)


def test_bounded_passes_gradient_on_closed_interval_only():
  g = jax.vmap(jax.grad(lambda a: Q.bounded(a, 0.5, 1.0)))(jnp.array([0.3, 0.5, 0.7, 1.0, 1.2]))
  np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 0])


def test_fat_symmetric_threshold_gradient_through_alpha():
  # T = clip(alpha) * T_max: d out / d alpha = T_max * d out / d T (finite differences on a smooth point: x > T)
  x, t_max = jnp.float32(3.0), jnp.float32(2.0)

  def out(alpha):
    lo, hi = Q.symmetric_range(alpha, t_max, True)
    return Q.fake_quant(x, lo, hi, 8, True)

  g = jax.grad(out)(jnp.float32(0.8))
  assert abs(float(g) - 2.0) < 1e-5  # out = T = 0.8 * 2 (clipped), d/d alpha = T_max
  assert float(jax.grad(out)(jnp.float32(1.2))) == 0.0  # alpha beyond its bound: no gradient


def test_asymmetric_range_formula():
  lo, hi = Q.asymmetric_range(jnp.float32(0.1), jnp.float32(0.8), jnp.float32(-1.0), jnp.float32(3.0))
  np.testing.assert_allclose([float(lo), float(hi)], [-1.0 + 0.1 * 4, -1.0 + 0.4 + 0.8 * 4], rtol=1e-6)
  # bounds: shift clipped to 0.4, width to 0.5
  lo, hi = Q.asymmetric_range(jnp.float32(0.9), jnp.float32(0.1), jnp.float32(0.0), jnp.float32(1.0),
                              (0.0, 0.4), (0.5, 1.0))
  np.testing.assert_allclose([float(lo), float(hi)], [0.4, 0.9], rtol=1e-6)


def test_range_off_zero_is_shifted_to_include_zero_keeping_its_width():
  p = Q.nudge(jnp.float32(0.4), jnp.float32(0.9), 8)
  assert float(p.nudged_min) == 0.0 and float(p.zero_point) == 0.0
  np.testing.assert_allclose(float(p.nudged_max), 0.5, rtol=1e-6)
  p = Q.nudge(jnp.float32(-2.0), jnp.float32(-0.5), 8)
  np.testing.assert_allclose([float(p.nudged_min), float(p.nudged_max)], [-1.5, 0.0], rtol=1e-6, atol=1e-7)


def test_quantize_bias_int32():
  b = jnp.array([0.5, -0.25, 1e9, -1e9])
  codes = jax.jit(Q.quantize_bias)(b, jnp.float32(0.01), jnp.array([0.02, 0.05, 1e-9, 1e-9]))
  assert codes.dtype == jnp.int32
  # saturates at +-(2^31 - 1) as the converter does (not at float32's 2^31, which int32 cannot hold)
  np.testing.assert_array_equal(np.asarray(codes), [2500, -500, 2**31 - 1, -(2**31 - 1)])
  edge = jnp.array([2147483520.0, -2147483520.0])  # the largest float32 below 2^31 is a code as it is
  np.testing.assert_array_equal(np.asarray(Q.quantize_bias(edge, jnp.float32(1), jnp.float32(1))), edge.astype(int))


def test_bad_bits_rejected():
  with pytest.raises(ValueError, match="num_bits"):
    Q.fake_quant(jnp.zeros(3), -1.0, 1.0, 1)


def test_exact_divide_is_correctly_rounded_under_jit():
  """XLA:CPU divides by a broadcast scalar through its reciprocal (off by an ulp on ~5% of values); scales must be
  the correctly rounded quotient, as numpy and the TFLite converter compute it."""
  import jax
  a = np.random.default_rng(0).uniform(0.1, 5, 100000).astype(np.float32)
  want = a / np.float32(254)
  assert np.any(np.asarray(jax.jit(lambda a: a / 254.0)(a)) != want)  # the rewrite this guards against
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: quantizers.exact_divide(a, 254))(a)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: quantizers.nudge(-a, a, 8, True).scale)(a)),
                                (a + a) / np.float32(254))


def test_exact_divide_outside_normal_numbers():
  """Subnormal, infinite and NaN operands and quotients that underflow or overflow: numpy's float32 quotient (XLA
  flushes subnormal results to zero on CPU, so those compare as 0), never a wrong exponent. Quantizing the smallest
  normal float32 on a coarse grid gave NaN codes before (found by the property tests)."""
  tiny, sub, big = np.finfo(np.float32).tiny, np.float32(1e-40), np.finfo(np.float32).max
  a = np.array([tiny, tiny, sub, 1.0, 1.0, big, np.inf, -np.inf, np.nan, 3.0, -tiny], np.float32)
  b = np.array([2.3, 3e5, 1.0, sub, 2e-38, 0.5, 2.0, 2.0, 1.0, 7.0, 2.3], np.float32)
  with np.errstate(all="ignore"):
    want = a / b
  want = np.where(np.abs(want) < np.finfo(np.float32).tiny, 0, want)  # flushed to zero either way
  got = np.asarray(jax.jit(quantizers.exact_divide)(a, b))
  got = np.where(np.abs(got) < np.finfo(np.float32).tiny, 0, got)
  np.testing.assert_array_equal(got, want)
  p = Q.nudge(jnp.float32(0.0), jnp.float32(7.0), 2)
  codes = np.asarray(Q.quantize(jnp.array([0.0, tiny, 2.0, 6.9], jnp.float32), p))
  np.testing.assert_array_equal(codes, [0, 0, 1, 3])


def _kl_reference(counts, lo, hi, alpha, levels, eps=1e-6):
  """TensorRT's entropy calibration for one clipping factor, in float64 numpy: the bin of 0 given the next one's
  count, the bins ``a [lo, hi]`` covers, the clipped counts added to its end bins (P), the window merged into
  ``levels`` chunks, each chunk's count spread over its non-empty bins (Q), ``KL(P || Q)``."""
  bins = len(counts)
  alpha, zero = np.float32(alpha), np.float32(min(max(-lo / (hi - lo) * bins, 0), bins))
  counts = counts.copy()
  at_zero = min(int(zero), bins - 1)
  counts[at_zero] = counts[at_zero + 1] if at_zero + 1 < bins else counts[at_zero - 1]
  start = int(min(max(np.round((1 - alpha) * zero), 0), bins - 1))
  stop = int(min(max(np.round(zero + alpha * (bins - zero)), start + 1), bins))
  window = counts[start:stop].astype(np.float64)
  p = window.copy()
  p[0] += counts[:start].sum()
  p[-1] += counts[stop:].sum()
  n = stop - start
  chunk = np.arange(n) * min(levels, n) // n
  totals, filled = np.bincount(chunk, weights=window), np.bincount(chunk, weights=window > 0)
  q = np.where(window > 0, totals[chunk] / np.maximum(filled[chunk], 1), 0.0)
  p, q = p / p.sum(), q / q.sum()
  return float(np.sum(p[p > 0] * np.log(p[p > 0] / np.where(q[p > 0] > 0, q[p > 0], eps))))


@pytest.mark.parametrize("lo,hi", [(0.0, 5.0), (-1.5, 4.0), (-4.0, -0.5), (0.5, 3.0)])
@pytest.mark.parametrize("levels", [7, 127, 255])
def test_entropy_divergences_equal_tensorrts_algorithm(lo, hi, levels):
  """Per slice (two histograms at once), for every clipping factor: the divergence of the numpy reference; a range
  off zero (all negative, all positive) clips towards zero as MSE's ``a [lo, hi]`` does."""
  rng = np.random.default_rng(levels)
  counts = np.stack([np.histogram(rng.laplace(size=20000) * (hi - lo) / 8 + (lo + hi) / 2, 2048, (lo, hi))[0],
                     rng.poisson(3.0, 2048) * (rng.uniform(size=2048) < 0.7)]).astype(np.float32)
  counts[:, 5] = 0  # an empty bin at some window's first bin
  factors = np.linspace(1.0, 0.2, 81, dtype=np.float32)
  got = np.asarray(Q.entropy_divergences(jnp.asarray(counts), jnp.full(2, lo), jnp.full(2, hi), factors, levels))
  want = np.array([[_kl_reference(c, lo, hi, a, levels) for c in counts] for a in factors])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)
  assert got.shape == (81, 2) and np.all(got >= -1e-6)


def test_entropy_divergence_keeps_a_uniform_range_and_clips_a_heavy_tail():
  """Uniform values are their own quantization at every grid of fewer steps than bins: the full range (factor 1.0)
  has divergence 0 and wins. A Laplacian's rare tail costs less clipped than the grid it would coarsen: a factor
  < 1, the lower the fewer the steps. A ReLU's zeros, exact on every grid, do not pull an 8-bit range in."""
  factors = np.linspace(1.0, 0.2, 81, dtype=np.float32)
  uniform = jnp.full(2048, 100.0)
  d = np.asarray(Q.entropy_divergences(uniform, 0.0, 1.0, factors, 15))
  assert d[0] < 1e-6 and np.argmin(d) == 0 and np.all(d[1:] > 1e-3)
  x = np.abs(np.random.default_rng(0).laplace(size=200000))
  counts = jnp.asarray(np.histogram(x, 2048, (0, x.max()))[0], jnp.float32)
  chosen = [factors[np.argmin(np.asarray(Q.entropy_divergences(counts, 0.0, x.max(), factors, steps)))]
            for steps in (255, 15)]
  assert 0.2 < chosen[1] < chosen[0] < 1.0, chosen
  relu = np.maximum(np.random.default_rng(1).standard_normal(400000), 0)  # half of it a point mass at 0
  counts = jnp.asarray(np.histogram(relu, 2048, (0, relu.max()))[0], jnp.float32)
  assert factors[np.argmin(np.asarray(Q.entropy_divergences(counts, 0.0, relu.max(), factors, 255)))] >= 0.7
  empty = np.asarray(Q.entropy_divergences(jnp.zeros(2048), 0.0, 1.0, factors, 15))  # no values: no NaN, full range
  assert np.all(empty == 0)


def test_histogram_quantile_of_a_large_calibration_set_keeps_its_tail():
  """1.2e8 values (100 MobileNet activations at 224 px): half zeros, the rest spread with a thin tail. Each quantile
  equals numpy's in float64, the last values included (a float32 running sum from the bottom stopped ~150 bins low
  at q = 1: past 2^24, a bin of a few values added nothing)."""
  bins = Q.HISTOGRAM_BINS
  counts = np.zeros(bins, np.float64)
  counts[0] = 6e7
  counts[1:1800] = np.round(6e7 * np.exp(-np.arange(1, 1800) / 150.0) / 150.0)
  counts[1800:] = [3, 0, 1] * 82 + [2] * 2  # a tail of a few values per bin, up to the last
  cumulative = np.cumsum(counts)
  for q in (0.5, 0.99, 0.9999, 0.99999, 0.999999, 1.0):
    want = int(np.argmax(cumulative >= q * cumulative[-1]))
    got = Q.histogram_quantile(jnp.asarray(counts, jnp.float32), 0.0, 1.0, q)
    assert float(got) == pytest.approx((want + 1) / bins, abs=1e-7), q
  assert float(Q.histogram_quantile(jnp.asarray(counts, jnp.float32), 0.0, 1.0, 1.0)) == 1.0


def test_quantize_bias_rounds_to_nearest():
  b = jnp.array([0.5004, -0.5004, 0.4996, -0.4996, 0.0107, -0.0107])  # quotients 2.7, -2.7, ... off the integers
  codes = np.asarray(Q.quantize_bias(b, jnp.float32(0.01), jnp.float32(0.02)))
  np.testing.assert_array_equal(codes, np.round(np.asarray(b, np.float64) / 2e-4).astype(int))
