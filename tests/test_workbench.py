"""The quantization workbench: power-of-two, fixed point, LSQ, intrinsic vs extrinsic, memory model, sweeps."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fatq import quantizers
from fatq.config import QuantConfig, QuantRule, QuantSpec
from fatq.data.paths import data_root
from fatq.layers import STATS, THRESHOLDS, FakeQuant, QConv, QDense
from fatq.workbench import analysis
from fatq.workbench import quantizers as wq

# ---------------------------------------------------------------------------------------------------------------------
# Specs.


def test_spec_kinds_validate():
  assert QuantSpec().kind == "uniform"
  QuantSpec(bits=20, kind="fixed_point", frac_bits=10, rounding="stochastic", placement="intrinsic")
  with pytest.raises(ValueError, match="kind"):
    QuantSpec(kind="log")
  with pytest.raises(ValueError, match="2..16"):
    QuantSpec(bits=20, kind="pot")
  with pytest.raises(ValueError, match="apply to kind=.fixed_point. only"):
    QuantSpec(bits=4, kind="pot", rounding="stochastic")


def _apply_point(spec, x, stats_x=None, thresholds=True):
  fq = FakeQuant(spec)
  stats = fq.apply({}, stats_x if stats_x is not None else x, mutable=[STATS])[1]
  variables = {**stats}
  if thresholds:
    _, th = fq.apply(variables, x, mutable=[THRESHOLDS])
    variables.update(th)
  return fq.apply(variables, x), variables


def test_default_kind_is_the_uniform_fake_quant():
  x = jax.random.normal(jax.random.key(0), (64, 7))
  y, _ = _apply_point(QuantSpec(bits=4, symmetric=False, trainable=False), x)
  want = quantizers.fake_quant(x, jnp.min(x), jnp.max(x), 4, False)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


# ---------------------------------------------------------------------------------------------------------------------
# Power of two.


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pot_signed_powers_of_two_in_budget(bits):
  rng = np.random.default_rng(bits)
  x = (rng.standard_normal(5000) * np.exp(rng.uniform(-8, 2, 5000))).astype(np.float32)
  t_max = np.abs(x).max()
  q = np.asarray(wq.pot(jnp.asarray(x), bits, jnp.asarray(t_max)))
  nz = q != 0
  mant, e = np.frexp(np.abs(q[nz]).astype(np.float64))
  np.testing.assert_array_equal(mant, 0.5)  # exact powers of two
  e = e - 1.0
  assert np.all(np.sign(q[nz]) == np.sign(x[nz]))
  e_max = np.round(np.log2(t_max))
  assert e.max() <= e_max and e.min() >= e_max - (2 ** (bits - 1) - 2)
  assert len(np.unique(q)) <= 2 ** bits - 1  # zero + both signs of 2^(bits-1)-1 exponents
  # Inside the budget the exponent is round(log2|x|).
  ex = np.round(np.log2(np.abs(x).astype(np.float64)))
  inside = (ex <= e_max) & (ex >= e_max - (2 ** (bits - 1) - 2))
  np.testing.assert_array_equal(np.abs(q[inside]), 2.0 ** ex[inside])
  assert np.all(q[ex < e_max - (2 ** (bits - 1) - 2)] == 0)


def test_pot_two_bits_is_ternary_and_fakequant_dispatches():
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
  y, _ = _apply_point(QuantSpec(bits=2, kind="pot", trainable=False), w)
  vals = np.unique(np.abs(np.asarray(y)))
  assert len(vals) <= 2 and vals.max() == 2.0 ** np.round(np.log2(float(jnp.max(jnp.abs(w)))))
  yc, _ = _apply_point(QuantSpec(bits=3, kind="pot", per_channel=True, trainable=False), w)
  for c in range(8):  # per channel: each channel's own exponent budget
    t = float(jnp.max(jnp.abs(w[..., c])))
    np.testing.assert_array_equal(np.asarray(yc[..., c]), np.asarray(wq.pot(w[..., c], 3, jnp.asarray(t))))


# ---------------------------------------------------------------------------------------------------------------------
# Fixed point.


@pytest.mark.parametrize("word,frac", [(4, 2), (8, 4), (8, 0), (12, 9)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fixed_point_grid_and_saturation(word, frac, rounding):
  x = jax.random.normal(jax.random.key(2), (4000,)) * 2.0 ** (word - frac)
  q = np.asarray(wq.fixed_point(x, word, frac, rounding, jax.random.key(3)), np.float64)
  lo, hi = -(2 ** (word - 1)) * 2.0 ** -frac, (2 ** (word - 1) - 1) * 2.0 ** -frac
  assert q.min() >= lo and q.max() <= hi
  assert q.min() == lo and q.max() == hi  # big inputs saturate
  np.testing.assert_array_equal(q * 2**frac, np.round(q * 2**frac))  # on the 2^-F grid
  xn = np.asarray(x, np.float64)
  inside = (xn > lo) & (xn < hi)
  assert np.all(np.abs(q[inside] - xn[inside]) <= (0.5 if rounding == "nearest" else 1.0) * 2.0**-frac + 1e-9)
  if rounding == "nearest":
    np.testing.assert_array_equal(q[inside], np.floor(xn[inside] * 2**frac + 0.5) / 2**frac)


def test_stochastic_rounding_is_unbiased():
  x = jnp.asarray([0.1, 0.3, -0.37, 1.23, -2.9, 0.5])
  keys = jax.random.split(jax.random.key(0), 20000)
  q = jax.vmap(lambda k: wq.fixed_point(x, 8, 2, "stochastic", k))(keys)
  mean = np.asarray(q.mean(0))
  # Standard error of the mean <= 0.25 * 0.5 / sqrt(20000) ~ 1e-3.
  np.testing.assert_allclose(mean, np.asarray(x), atol=5e-3)
  # Nearest rounding is biased for these values.
  assert np.max(np.abs(np.asarray(wq.fixed_point(x, 8, 2)) - np.asarray(x))) > 0.04


def test_fixed_point_gradient_straight_through_inside_zero_outside():
  g = jax.grad(lambda x: jnp.sum(wq.fixed_point(x, 4, 2)))(jnp.asarray([0.3, -0.6, 5.0, -5.0]))
  np.testing.assert_array_equal(np.asarray(g), [1, 1, 0, 0])


# ---------------------------------------------------------------------------------------------------------------------
# LSQ.


def test_lsq_forward_and_gradient_match_formulas():
  x = jnp.asarray([-3.0, -0.74, -0.2, 0.0, 0.26, 0.61, 1.04, 2.5])
  s, bits = jnp.asarray(0.3), 3
  qn, qp = wq.lsq_levels(bits, True)
  assert (float(qn), float(qp)) == (4.0, 3.0)
  g = float(wq.lsq_grad_scale(x.size, qp))
  assert g == pytest.approx(1 / np.sqrt(8 * 3))
  y = wq.lsq(x, s, qn, qp, g)
  v = np.asarray(x) / 0.3
  np.testing.assert_allclose(np.asarray(y), np.round(np.clip(v, -4, 3)) * 0.3, rtol=1e-6)
  # Esser et al. eq. 3, per element, times the gradient scale.
  ds = jax.grad(lambda s: jnp.sum(wq.lsq(x, s, qn, qp, g)))(s)
  per = np.where(v <= -4, -4.0, np.where(v >= 3, 3.0, np.round(v) - v))
  assert float(ds) == pytest.approx(g * per.sum(), rel=1e-5)
  dx = jax.grad(lambda x: jnp.sum(wq.lsq(x, s, qn, qp, g)))(x)
  np.testing.assert_array_equal(np.asarray(dx), ((v > -4) & (v < 3)).astype(np.float32))


def test_lsq_step_gradient_matches_finite_differences_of_the_smooth_part():
  # With round() replaced by the identity the quantizer is x inside and the clipped level outside, so the step's
  # gradient reduces to (number above * Q_p - number below * Q_n) * g: check against central differences of that.
  x = jnp.asarray([-9.0, -0.5, 0.2, 0.9, 7.0, 8.0])
  qn, qp, g = jnp.asarray(4.0), jnp.asarray(3.0), 0.25

  def smooth(s):
    v = x / s
    return jnp.sum(jnp.clip(v, -qn, qp) * s) * g

  h = 1e-2
  fd = (smooth(1.0 + h) - smooth(1.0 - h)) / (2 * h)
  ds = jax.grad(lambda s: jnp.sum(wq.lsq(x, s, qn, qp, g)))(jnp.asarray(1.0))
  per_inside = np.sum(np.round(np.asarray(x)[1:4]) - np.asarray(x)[1:4]) * g  # rounding residuals
  assert float(ds) == pytest.approx(float(fd) + per_inside, rel=1e-3)


def test_lsq_fakequant_trains_step_in_thresholds_collection():
  w = jax.random.normal(jax.random.key(4), (5, 5, 1, 6))
  spec = QuantSpec(bits=4, kind="lsq", per_channel=True)
  y, variables = _apply_point(spec, w)
  step = variables[THRESHOLDS]["step"]
  assert step.shape == (6,)
  t = np.max(np.abs(np.asarray(w).reshape(-1, 6)), 0)
  np.testing.assert_allclose(np.asarray(step), t / 7, rtol=1e-6)  # initial step: T_max / Q_p
  grads = jax.grad(lambda th: jnp.sum((FakeQuant(spec).apply({**variables, THRESHOLDS: th}, w) - w) ** 2))(
      variables[THRESHOLDS])
  assert np.all(np.isfinite(grads["step"])) and np.any(grads["step"] != 0)
  # Unsigned activations use [0, 2^b - 1].
  a = jax.nn.relu(jax.random.normal(jax.random.key(5), (32, 10)))
  ya, va = _apply_point(QuantSpec(bits=2, kind="lsq"), a)
  assert float(va[THRESHOLDS]["step"]) == pytest.approx(float(a.max()) / 3)
  assert len(np.unique(np.asarray(ya))) <= 4


# ---------------------------------------------------------------------------------------------------------------------
# Intrinsic vs extrinsic.


def _q_np(v, word, frac):
  u = np.clip(v.astype(np.float32), -(2 ** (word - 1)) / 2**frac, (2 ** (word - 1) - 1) / 2**frac) * np.float32(
      2**frac)
  r = np.clip(np.floor(u + np.float32(0.5)), -(2 ** (word - 1)), 2 ** (word - 1) - 1)
  return (r / np.float32(2**frac)).astype(np.float32)


def _intrinsic_dense_np(x, w, b, word, frac):
  out = np.zeros((x.shape[0], w.shape[1]), np.float32)
  for n in range(x.shape[0]):
    for c in range(w.shape[1]):
      acc = None
      for k in range(x.shape[1]):
        p = _q_np(np.float32(x[n, k]) * np.float32(w[k, c]), word, frac)
        acc = p if acc is None else _q_np(np.float32(acc + p), word, frac)
      out[n, c] = _q_np(np.float32(acc + b[c]), word, frac)
  return out


def _layer(module, x, word, frac, placement):
  spec = QuantSpec(bits=word, kind="fixed_point", frac_bits=frac, placement=placement)
  m = module.clone(quant=QuantConfig((QuantRule(r".*output", spec), QuantRule(r".*", None))))
  params = module.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(9), p.shape), params)
  stats = m.apply({"params": params}, x, mutable=[STATS])[1]
  return np.asarray(m.apply({"params": params, **stats}, x)), params


def test_intrinsic_dense_matches_numpy_and_differs_from_extrinsic():
  x = jax.random.normal(jax.random.key(6), (3, 9))
  word, frac = 6, 3
  yi, p = _layer(QDense(4), x, word, frac, "intrinsic")
  ye, _ = _layer(QDense(4), x, word, frac, "extrinsic")
  w, b = np.asarray(p["kernel"]), np.asarray(p["bias"])
  np.testing.assert_array_equal(yi, _intrinsic_dense_np(np.asarray(x), w, b, word, frac))
  np.testing.assert_allclose(ye, _q_np(np.asarray(x, np.float64) @ w + b, word, frac), atol=2.0**-frac + 1e-6)
  assert np.mean(ye == _q_np((np.asarray(x, np.float64) @ w + b), word, frac)) > 0.9
  assert not np.array_equal(yi, ye)


def test_intrinsic_conv_matches_numpy_patches_in_channel_major_order():
  x = jax.random.normal(jax.random.key(7), (2, 5, 5, 2))
  word, frac = 8, 3
  conv = QConv(3, (3, 3), padding="VALID")
  yi, p = _layer(conv, x, word, frac, "intrinsic")
  ye, _ = _layer(conv, x, word, frac, "extrinsic")
  k, b = np.asarray(p["kernel"]), np.asarray(p["bias"])
  xn = np.asarray(x)
  patches = np.stack([xn[:, i:i + 3, j:j + 3, :] for i in range(3) for j in range(3)], 0)  # (9, N, 3, 3, C)
  rows = []
  for n in range(2):
    for i in range(3):
      for j in range(3):
        patch = xn[n, i:i + 3, j:j + 3, :]  # (kh, kw, c) -> order (c, kh, kw)
        rows.append(np.transpose(patch, (2, 0, 1)).ravel())
  wmat = np.transpose(k, (2, 0, 1, 3)).reshape(-1, 3)
  ref = _intrinsic_dense_np(np.stack(rows), wmat, b, word, frac).reshape(2, 3, 3, 3)
  np.testing.assert_array_equal(yi, ref)
  float_out = np.einsum("nk,kc->nc", np.stack(rows).astype(np.float64), wmat).reshape(2, 3, 3, 3) + b
  np.testing.assert_allclose(ye, _q_np(float_out, word, frac), atol=2.0**-frac + 1e-6)
  assert not np.array_equal(yi, ye)
  del patches


def test_intrinsic_with_wide_words_equals_float():
  x = jax.random.normal(jax.random.key(8), (2, 6, 6, 3))
  yi, p = _layer(QConv(4, (3, 3)), x, 32, 20, "intrinsic")
  ref = QConv(4, (3, 3)).apply({"params": p}, x)
  np.testing.assert_allclose(yi, np.asarray(ref), atol=1e-4)


def test_stochastic_intrinsic_uses_quantize_rng():
  x = jax.random.normal(jax.random.key(6), (3, 9))
  spec = QuantSpec(bits=6, kind="fixed_point", frac_bits=2, placement="intrinsic", rounding="stochastic")
  m = QDense(4, quant=QuantConfig((QuantRule(r".*output", spec),)))
  params = QDense(4).init(jax.random.key(0), x)["params"]
  stats = m.apply({"params": params}, x, mutable=[STATS])[1]
  v = {"params": params, **stats}
  a = m.apply(v, x, rngs={"quantize": jax.random.key(1)})
  b = m.apply(v, x, rngs={"quantize": jax.random.key(2)})
  c = m.apply(v, x)
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(m.apply(v, x)))  # data-derived key: deterministic
  # every draw on the grid of 2^-2, and unbiased: each of the 19 roundings (9 products, 9 sums, the bias) has a
  # standard deviation of at most half a step, so the mean of 64 draws is within ~0.07 of the exact output
  run = jax.jit(lambda key: m.apply(v, x, rngs={"quantize": key}))
  draws = np.stack([np.asarray(run(jax.random.key(s))) for s in range(64)])
  np.testing.assert_array_equal(draws * 4, np.round(draws * 4))
  exact = np.asarray(x, np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"])
  assert np.max(np.abs(draws.mean(0) - exact)) < 0.3, np.abs(draws.mean(0) - exact)


# ---------------------------------------------------------------------------------------------------------------------
# Analysis: sizes, bit efficiency, memory model.


def test_quantize_weight_matches_fakequant_specs():
  w = np.array(jax.random.normal(jax.random.key(3), (5, 5, 6, 16)))
  w[..., 0] = np.abs(w[..., 0]) + 0.5  # a channel of one sign: its per-channel range is [0, max]
  for method in analysis.METHODS:
    for bits in (2, 4, 8):
      for per_channel in (False, True):
        y, _ = _apply_point(analysis.weight_spec(method, bits, per_channel), jnp.asarray(w), thresholds=False)
        want = analysis.quantize_weight(w, method, bits, per_channel)
        np.testing.assert_allclose(np.asarray(y), want, atol=1e-6)
        assert len(np.unique(want)) <= 2**bits * (16 if per_channel else 1)
  # the one-signed channel keeps its largest weights (a range nudged to end at 0 would clip them)
  asym = analysis.quantize_weight(w, "asym", 8, per_channel=True)
  assert np.max(np.abs(asym[..., 0] - w[..., 0])) <= w[..., 0].max() / 255 / 2 + 1e-6


def test_model_size_and_efficiency_by_hand():
  k = np.array([[-1.0, 0.0], [0.5, 1.0]], np.float32)
  s = analysis.model_size([k], [np.zeros(2, np.float32)], 2)
  assert s["raw"] == 4 * 4 + 1 + 8  # codebook of 4 float32 + 4 codes x 2 bits + two float32 biases
  assert analysis.model_size([k], [], None)["raw"] == 16
  e = analysis.efficiency(k, k, 2)
  assert e["levels_used"] == 4 and e["occupancy"] == 1.0 and e["bit_efficiency"] == pytest.approx(1.0)
  assert e["octaves"] == pytest.approx(1.0) and e["range_fraction"] == 1.0
  q = analysis.quartiles(np.arange(10, dtype=np.float32).reshape(5, 2))
  np.testing.assert_allclose(q[0], [0, 2, 4, 6, 8])


def test_fixed_point_nearest_rounding_is_exact_in_float32():
  # floor(u + 0.5) rounded the sum (0.49999997 -> 1) and u + (r - u) moved values already on the grid
  from fatq.workbench.quantizers import fixed_point

  for word, frac, x, want in ((8, 0, 0.49999997, 0.0), (8, 0, 0.5, 1.0), (8, 0, -0.5, 0.0), (8, 2, 1.3, 1.25),
                              (24, 0, 8388607.0, 8388607.0), (32, 0, 8388609.0, 8388609.0),
                              (32, 20, 8 + 2.0 ** -20, 8 + 2.0 ** -20)):
    assert float(fixed_point(jnp.float32(x), word, frac)) == want, (word, frac, x)
  assert float(jax.grad(lambda x: fixed_point(x, 8, 2))(jnp.float32(1.3))) == 1.0


def test_per_channel_sizes_and_efficiency_use_each_channels_grid():
  # per channel, each output channel has its own 16 levels: a tensor-wide codebook had ~16 x 32 entries, whose
  # indices wrapped modulo 256 in one byte, and an occupancy of 12 "of the 16 codes"
  w = np.random.default_rng(0).normal(size=(3, 3, 8, 32)) * np.geomspace(0.01, 10, 32)
  w_q = analysis.quantize_weight(w.astype(np.float32), "sym", 4, per_channel=True)
  size = analysis.model_size([w_q], [], 4, per_channel=True)
  books = sum(np.unique(w_q[..., c]).size for c in range(32))
  assert books <= 32 * 16 and size["raw"] == 4 * books + 32 * 72 * 4 // 8
  with pytest.raises(ValueError, match=r"4-bit grid has \d+ distinct values: the weights are not on one 4-bit grid "
                                       r"per tensor"):
    analysis.model_size([w_q], [], 4)
  e = analysis.efficiency(w, w_q, 4, per_channel=True)
  assert 0.5 < e["occupancy"] <= 1.0 and 0.3 < e["bit_efficiency"] <= 1.0
  channel = analysis.efficiency(w[..., 5], w_q[..., 5], 4)  # one channel's grid alone
  assert channel["levels_used"] == np.unique(w_q[..., 5]).size


def test_memory_model_by_hand_for_a_tiny_model():
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = QConv(2, (3, 3), padding="VALID", name="conv")(x)  # 4x4x1 -> 2x2x2: 3*3*1*2 + 2 = 20 params, 8 acts
      return QDense(3, name="fc")(x.reshape(x.shape[0], -1))  # 8*3 + 3 = 27 params, 3 acts

  from fatq.workbench.experiments import model_memory

  model = Tiny()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
  assert analysis.activation_sizes(model, params, (4, 4, 1)) == [("input", 16), ("conv", 8), ("fc", 3)]
  n_p, largest, total, (m,) = model_memory(model, params, (4, 4, 1), [(4, 8)], batch_size=10, slots=2)
  assert (n_p, largest, total) == (47, 16, 27)
  assert m["inference_params"] == 47 * 4 / 8 and m["inference_activation"] == 16 * 8 / 8
  assert m["inference_total"] == 23.5 + 16
  assert m["training_total"] == 47 * 4 + 2 * 47 * 4 + 10 * 27 * 8 / 8
  assert analysis.memory(10, 5, 5, 2)["act_bits"] == 4  # the survey's b_a = max(b_p, 4)
  assert analysis.memory(10, 5, 5, 3, 3)["inference_total"] == (30 + 15) / 8


def test_layer_order_is_execution_order_not_key_order():
  import flax.linen as nn

  from fatq.workbench.experiments import analysis_layers

  class Deep(nn.Module):  # l1 .. l11: key-sorted pytrees put l10, l11 before l2
    @nn.compact
    def __call__(self, x):
      for i in range(1, 12):
        x = QDense(2, name=f"l{i}")(x)
      return x

  model = Deep()
  params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
  want = [f"l{i}" for i in range(1, 12)]
  assert [n for n, _ in analysis_layers(params, model, (3,))] == want
  assert [n for n, _ in analysis.activation_sizes(model, params, (3,))] == ["input"] + want


def test_memory_of_lenet5_by_hand():
  from fatq.workbench.experiments import build_shipped, model_memory

  model, params, shape = build_shipped("lenet5")
  n_p, largest, total, (m,) = model_memory(model, params, shape, [(8, 8)], 1, 1)
  assert n_p == (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
  assert largest == 28 * 28 * 6
  assert total == 784 + 28 * 28 * 6 + 10 * 10 * 16 + 120 + 84 + 10
  assert m["inference_total"] == n_p + largest


# ---------------------------------------------------------------------------------------------------------------------
# Sweeps.


def _tiny_cfg(experiment, **kw):
  c = ml_collections.ConfigDict(dict(experiment=experiment, seed=0, **kw))
  return c


@pytest.mark.slow  # ~50 s on 2 busy cores (trains a float LeNet-5)
def test_datafree_sweep_on_a_slice_of_mnist_writes_results(tmp_path):
  from fatq.workbench import experiments

  cfg = _tiny_cfg("datafree", tasks=[dict(model="lenet5", dataset="mnist", float_epochs=1, float_limit=512,
                                          num_eval=200, num_train=200, num_holdout=100)],
                  methods=("asym", "pot"), bits=(4,), per_channel=False, eval_batch_size=100)
  results, text = experiments.run(cfg, str(tmp_path), log=lambda s: None)
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["model"] == "lenet5" and saved["dataset"] == "mnist" and "total" in saved["timings"]
  mnist = str(data_root() / "mnist")
  assert saved["sources"] == {"lenet5_mnist": {"unlabeled": f"{mnist} train (labels not read)",
                                               "evaluation": f"{mnist} test"}}
  assert [(r["method"], r["bits"]) for r in saved["rows"]] == [("float", 32), ("asym", 4), ("pot", 4)]
  assert all(0 <= r["top1"] <= 1 and r["size"]["lzma"] > 0 for r in saved["rows"])
  assert saved["rows"][1]["size"]["raw"] < saved["rows"][0]["size"]["raw"]
  assert os.path.exists(tmp_path / "datafree.png")
  assert "asym" in text


def test_memory_sweep_writes_results_and_plot(tmp_path):
  from fatq.workbench import experiments

  cfg = _tiny_cfg("memory", models=("lenet5",), settings=((32, 32), (2, 0)), batch_size=4, optimizer_slots=1)
  results, _ = experiments.run(cfg, str(tmp_path), log=lambda s: None)
  assert [r["act_bits"] for r in results["rows"]] == [32, 4]
  assert os.path.exists(tmp_path / "memory.png") and os.path.exists(tmp_path / "results.json")
  assert results["sources"] == {}  # synthetic inputs: no data read


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fixed_point", "lsq", "sensitivity", "bit_efficiency"])
def test_quick_configs_run(tmp_path, name):
  from fatq import cli
  from fatq.workbench import experiments

  config = cli.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", f"workbench_{name}.py:quick"))
  results, _ = experiments.run(config, str(tmp_path), log=lambda s: None)
  assert results["rows"] and os.path.exists(tmp_path / "results.json")
  assert any(f.endswith(".png") for f in os.listdir(tmp_path))


def test_lenet_task_trains_its_float_model_again_when_its_settings_change(tmp_path):
  # the cached float LeNet-5 was reused whatever float_epochs / float_limit said, while results.json recorded them
  from fatq.workbench import experiments as X

  t = dict(model="lenet5", dataset="mnist", float_epochs=1, float_limit=256, num_train=100, num_calibration=10,
           num_holdout=10, num_eval=100)
  logs = []
  first = X.load_task(t, str(tmp_path), log=logs.append)
  again = X.load_task(t, str(tmp_path), log=logs.append)
  assert any("training the float LeNet-5, 1 epochs on 256" in line for line in logs)
  assert "loaded from" in logs[-1]
  jax.tree.map(np.testing.assert_array_equal, first.params, again.params)
  logs.clear()
  X.load_task(dict(t, float_limit=128), str(tmp_path), log=logs.append)
  assert "trained with other settings (images 256 -> 128); training it again" in logs[0], logs
  assert any("on 128 labeled images" in line for line in logs)


def test_bit_efficiency_checks_quartile_bits_before_the_work(tmp_path):
  from fatq.workbench import experiments

  cfg = _tiny_cfg("bit_efficiency", tasks=[dict(model="lenet5")], methods=("sym",), bits=(8, 2), quartile_bits=4,
                  per_channel=False, quartile_channels=4)
  with pytest.raises(ValueError, match=r"quartile_bits = 4 is not one of config.bits = \(8, 2\)"):
    experiments.run(cfg, str(tmp_path), log=lambda s: None)


def test_sweep_methods_and_bit_widths_are_checked_before_the_work(tmp_path):
  from fatq.workbench import experiments

  for change, message in ((dict(methods=("asym", "sim")), r"config.methods: unknown method\(s\) \['sim'\]"),
                          (dict(bits=(8, 1)), r"config.bits = \(8, 1\): bit widths must be integers in 2..16")):
    cfg = _tiny_cfg("datafree", **{**dict(tasks=[dict(model="lenet5")], methods=("sym",), bits=(8,)), **change})
    with pytest.raises(ValueError, match=message):
      experiments._check_sizes(cfg)


def test_mobilenet_task_reads_the_folders_it_names(tmp_path, monkeypatch, imagenet_folders):
  """A MobileNet task takes a config data section's keys (val_dir, unlabeled_dir, tfds_name, ...): its images come
  from there, and results.json's ``dataset`` names them; without them, the embedded folders."""
  from fatq.workbench import experiments as X

  val, unlabeled = imagenet_folders(6, 12)
  lines = (val / "labels.txt").read_text().splitlines()
  t = dict(model="mobilenet_v1_0.75", val_dir=str(val), unlabeled_dir=str(unlabeled), cache_dir=str(tmp_path / "c"),
           num_train=4, num_calibration=4, num_holdout=2, num_eval=0, image_size=96)  # image_size: the model's, 224
  task = X.load_task(t, str(tmp_path / "w"), log=lambda *_: None)
  assert task.data.eval_images.shape == (6, 224, 224, 3)
  assert task.data.eval_labels.tolist() == [int(line.split(",")[1]) for line in lines]
  assert (len(task.data.train), len(task.data.calibration), len(task.data.holdout)) == (4, 4, 2)
  assert task.data.sources == dict(unlabeled=str(unlabeled), evaluation=str(val)) == X._sources(t)
  assert X._dataset(t) == str(val)
  # a label file of another numbering stops the task, as it stops finetune.py, rather than scoring 0 % top-1
  (val / "labels.txt").write_text("".join(f"{n},{int(label) + 1000}\n" for n, label in (s.split(",") for s in lines)))
  with pytest.raises(ValueError, match="labels run from 1.* but the model has 1000 classes"):
    X.load_task(t, str(tmp_path / "w"), log=lambda *_: None)
  assert X._dataset(dict(model="mobilenet_v1_0.75", tfds_name="imagenet2012")) == "tfds imagenet2012 validation"
  monkeypatch.setenv("FATQ_DATA", str(tmp_path / "root"))
  assert X._dataset(dict(model="mobilenet_v1_0.75")) == str(tmp_path / "root" / "imagenet" / "val")
  assert X._dataset(dict(model="lenet5", dataset="fashion_mnist")) == "fashion_mnist"
  assert X._sources(dict(model="lenet5", dataset="fashion_mnist", data_dir=str(tmp_path / "f"))) == dict(
      unlabeled=f"{tmp_path / 'f'} train (labels not read)", evaluation=f"{tmp_path / 'f'} test")


def test_largest_batch_search_ends_on_a_multiple_of_the_resolution():
  # bench/memory.py's search on a fake bench whose peak is exactly affine in the batch: the answer is the largest
  # multiple of the resolution within the budget, also from a --batch that is not one (it answered 18 for 16 before)
  import importlib.util
  import random

  spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(os.path.dirname(__file__), "..",
                                                                               "bench", "memory.py"))
  memory = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(memory)

  class Affine:
    def __init__(self, fixed, per_image):
      self.fixed, self.per_image = fixed, per_image

    def compile(self, phase, b):
      return None, dict(batch=b, peak=int(self.fixed + self.per_image * b), compile_s=0.0)

  rng = random.Random(0)
  for _ in range(300):
    bench = Affine(rng.uniform(1e8, 2e9), rng.uniform(1e6, 1e8))
    budget, resolution, batch = int(rng.uniform(2e9, 2e10)), rng.choice([1, 4, 8, 16]), rng.randint(1, 100)
    _, known = bench.compile("phase", batch)
    found = memory.largest_batch(bench, "phase", budget, known, resolution, lambda s: None)
    want = max(int((budget - bench.fixed) // bench.per_image) // resolution * resolution, 0)
    assert found["batch"] == want, (budget, resolution, batch, found)


def test_workbench_sizes_are_checked_before_the_work(tmp_path):
  # a negative count sliced images off the other end (num_eval=-5: all but 5), a zero batch failed after training
  from fatq.workbench import experiments

  for task, top, message in ((dict(num_eval=-5), {}, r"config.tasks\[0\].num_eval = -5: must be an integer >= 0"),
                             ({}, dict(eval_batch_size=0), r"config.eval_batch_size = 0: must be an integer >= 1"),
                             (dict(float_epochs=0), {},
                              r"config.tasks\[0\].float_epochs = 0: must be an integer >= 1")):
    cfg = _tiny_cfg("datafree", tasks=[dict(model="lenet5", **task)], methods=("sym",), bits=(4,), per_channel=False,
                    **{"eval_batch_size": 100, **top})
    with pytest.raises(ValueError, match=message):
      experiments.run(cfg, str(tmp_path / "w"), log=lambda s: None)
  assert not (tmp_path / "w").exists()
