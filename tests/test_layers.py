"""Quantized layers, rules, calibration, batch-norm folding and the fast convolution path."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fatq
from fatq import layers
from fatq import quantizers as Q
from fatq.layers import conv2d
from fatq.models import LeNet5, mobilenet_v2


def _rand(key, shape, scale=1.0):
  return jax.random.normal(jax.random.key(key), shape) * scale


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 1), (1, 1))])
@pytest.mark.parametrize("size", [7, 8])
def test_fast_depthwise_equals_lax(stride, padding, size):
  x = _rand(0, (2, size, size, 5))
  k = _rand(1, (3, 3, 1, 5))
  ref = conv2d(x, k, (stride, stride), padding, groups=5, impl="lax")
  fast = conv2d(x, k, (stride, stride), padding, groups=5, impl="fast")
  assert fast.shape == ref.shape
  np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=1e-5)
  # the hand-written backward pass (custom_vjp): input and kernel gradients of a non-linear loss
  _assert_same_gradients(lambda x, k, impl: conv2d(x, k, (stride, stride), padding, 5, impl), x, k)


def _assert_same_gradients(conv, x, k):
  grads = {impl: jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, impl)) * jnp.arange(conv(x, k, impl).size)
                                               .reshape(conv(x, k, impl).shape) / 100), argnums=(0, 1))(x, k)
           for impl in ("fast", "lax")}
  for g_fast, g_lax in zip(grads["fast"], grads["lax"]):
    np.testing.assert_allclose(g_fast, g_lax, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_fast_pointwise_equals_lax(stride):
  x = _rand(2, (2, 9, 9, 6))
  k = _rand(3, (1, 1, 6, 4))
  np.testing.assert_allclose(conv2d(x, k, (stride, stride), "SAME", impl="fast"),
                             conv2d(x, k, (stride, stride), "SAME", impl="lax"), atol=1e-5, rtol=1e-5)
  _assert_same_gradients(lambda x, k, impl: conv2d(x, k, (stride, stride), "SAME", impl=impl), x, k)


@pytest.mark.parametrize("channel_axis", [None, -1, 0])  # None: per tensor
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_fast_depthwise_threshold_gradients_equal_lax(channel_axis, symmetric, stride, monkeypatch):
  # a fast depthwise layer takes its quantized kernel linearized in the FAT factors and computes their gradient
  # forward (layers._depthwise_linearized): the same output and threshold gradients as the plain convolution.
  # Ranges along another axis than the channels' (here the kernel's rows) take the dense kernel instead.
  spec = fatq.QuantSpec.fat(8, per_channel=channel_axis is not None, symmetric=symmetric)
  spec = spec if channel_axis is None else dataclasses.replace(spec, channel_axis=channel_axis)
  quant = dataclasses.replace(fatq.QuantConfig.uniform(spec, fatq.QuantSpec.fat(8, symmetric=False)),
                              learn_biases=".*")
  x = _rand(6, (3, 9, 9, 6))
  taken, linearized = [], layers._depthwise_linearized
  monkeypatch.setattr(layers, "_depthwise_linearized", lambda *args: taken.append(1) or linearized(*args))
  outputs, grads = {}, {}
  for impl in ("fast", "lax"):
    model = layers.QConv(6, (3, 3), (stride, stride), groups=6, activation="relu6", quant=quant, impl=impl)
    params = model.init(jax.random.key(1), x)["params"]
    stats = fatq.calibrate(model, params, [x])
    thresholds = fatq.init_thresholds(model, params, stats, x[:1])
    # factors off their initial values and bounds, where every term of the gradient is non-zero
    thresholds = jax.tree.map(lambda t: t * 0.83 + 0.07, thresholds)
    variables = {"params": params, "quant_stats": stats}

    def loss(t):
      y = model.apply({**variables, "quant": t}, x)
      return jnp.sum(jnp.sin(3 * y) * jnp.arange(y.size).reshape(y.shape) / y.size)

    outputs[impl] = model.apply({**variables, "quant": thresholds}, x)
    grads[impl] = jax.grad(loss)(thresholds)
  assert bool(taken) == (channel_axis != 0), "the fast layer took the wrong kernel form"
  np.testing.assert_allclose(outputs["fast"], outputs["lax"], atol=1e-5, rtol=1e-5)
  flat_fast, flat_lax = (jax.tree_util.tree_leaves_with_path(grads[impl]) for impl in ("fast", "lax"))
  assert len(flat_fast) == len(flat_lax) == (4 if symmetric else 5)  # kernel factors, output factors, bias offset
  for (path, g_fast), (_, g_lax) in zip(flat_fast, flat_lax):
    if "kernel_quant" in str(path):  # the gradient that takes the new route
      assert np.abs(g_lax).min() > 1e-3, path
    np.testing.assert_allclose(g_fast, g_lax, atol=1e-5 * np.abs(g_lax).max(), rtol=1e-4, err_msg=str(path))


def test_materialized_is_exact():
  # the product with the identity that keeps XLA from recomputing a kernel per pixel changes no bit
  a = _rand(7, (3, 3, 1, 40)) * jnp.logspace(-30, 30, 40)
  np.testing.assert_array_equal(jax.jit(layers._materialized)(a), a)


def test_fast_depthwise_5x5_gradients_equal_lax():
  x = _rand(4, (1, 10, 10, 3))
  k = _rand(5, (5, 5, 1, 3))
  g_fast = jax.grad(lambda k: jnp.sum(jnp.sin(conv2d(x, k, (2, 2), "SAME", 3, "fast"))))(k)
  g_lax = jax.grad(lambda k: jnp.sum(jnp.sin(conv2d(x, k, (2, 2), "SAME", 3, "lax"))))(k)
  np.testing.assert_allclose(g_fast, g_lax, atol=1e-4, rtol=1e-4)


def test_batch_norm_folding_equals_unfolded():
  x = _rand(6, (4, 8, 8, 3))
  conv = nn.Conv(5, (3, 3), use_bias=True)
  bn = nn.BatchNorm(use_running_average=True, epsilon=1e-3)
  cvars = conv.init(jax.random.key(0), x)
  y = conv.apply(cvars, x)
  bvars = bn.init(jax.random.key(1), y)
  stats = {"mean": _rand(7, (5,)), "var": jnp.abs(_rand(8, (5,))) + 0.1}
  bparams = {"scale": _rand(9, (5,)), "bias": _rand(10, (5,))}
  ref = bn.apply({"params": bparams, "batch_stats": stats}, y)
  k, b = fatq.fold_batch_norm(cvars["params"]["kernel"], cvars["params"]["bias"], bparams["scale"],
                              bparams["bias"], stats["mean"], stats["var"], eps=1e-3)
  folded = conv2d(x, jnp.asarray(k)) + b
  np.testing.assert_allclose(folded, ref, atol=1e-5, rtol=1e-5)
  del bvars


def test_batch_norm_folding_depthwise_and_shape_errors():
  k = np.ones((3, 3, 1, 4), np.float32)
  kf, bf = fatq.fold_batch_norm(k, None, np.arange(1, 5), np.zeros(4), np.ones(4), np.full(4, 3.0), eps=1.0)
  np.testing.assert_allclose(kf[0, 0, 0], np.arange(1, 5) / 2.0)
  np.testing.assert_allclose(bf, -np.arange(1, 5) / 2.0)
  with pytest.raises(ValueError, match=r"gamma has shape \(3,\), expected \(4,\)"):
    fatq.fold_batch_norm(k, None, np.ones(3), np.zeros(4), np.zeros(4), np.ones(4), eps=1e-3)
  with pytest.raises(ValueError, match=r"bias has shape \(4, 4\), expected \(4,\)"):
    fatq.fold_batch_norm(k, np.zeros((4, 4)), np.ones(4), np.zeros(4), np.zeros(4), np.ones(4), eps=1e-3)
  with pytest.raises(ValueError, match=r"moving_variance \+ eps must be finite and positive; channel\(s\) \[1, 3\]"):
    fatq.fold_batch_norm(k, None, np.ones(4), np.zeros(4), np.zeros(4), np.array([1, -1, 1, np.nan]), eps=1e-3)


def _lenet(quant=None):
  m = LeNet5(quant=quant)
  x = np.asarray(jax.random.uniform(jax.random.key(0), (16, 28, 28, 1)))
  return m, m.init(jax.random.key(1), x)["params"], x


QCFG = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(8, per_channel=True), fatq.QuantSpec.fat(8, symmetric=False))


def test_calibration_statistics_are_min_max_over_all_batches():
  m, params, x = _lenet(QCFG)
  stats = fatq.calibrate(m, params, [x[:5], x[5:11], x[11:]])
  pts = fatq.points(stats)
  assert set(pts) == {"input", "conv1/kernel", "conv1/output", "conv2/kernel", "conv2/output", "fc1/kernel",
                      "fc1/output", "fc2/kernel", "fc2/output", "fc3/kernel", "fc3/output"}
  np.testing.assert_allclose(pts["input"]["min"], x.min())
  np.testing.assert_allclose(pts["input"]["max"], x.max())
  # per-channel weight statistics, along the output channel
  np.testing.assert_allclose(pts["conv2/kernel"]["max"], params["conv2"]["kernel"].max(axis=(0, 1, 2)))
  assert pts["conv2/kernel"]["min"].shape == (16,)
  # an activation statistic equals the float model's tensor over the whole set
  logits = m.clone(quant=None).apply({"params": params}, x)
  np.testing.assert_allclose(pts["fc3/output"]["max"], logits.max(), rtol=1e-6)


def test_one_model_three_roles_and_ptq_error_bound():
  m, params, x = _lenet(QCFG)
  float_out = m.apply({"params": params}, x)
  np.testing.assert_allclose(float_out, m.clone(quant=None).apply({"params": params}, x))  # no stats: float
  stats = fatq.calibrate(m, params, [x])
  q_out = m.apply({"params": params, "quant_stats": stats}, x)
  assert not np.allclose(q_out, float_out)
  ranges = fatq.quant_ranges(m, {"params": params, "quant_stats": stats}, x)
  step = float(ranges["fc3/output"]["scale"])
  # 8-bit model close to float (a few output steps), and its logits lie on the output grid
  assert float(jnp.max(jnp.abs(q_out - float_out))) < 10 * step
  codes = np.asarray(q_out / step + ranges["fc3/output"]["zero_point"])
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-2)
  # the weights used are the per-channel fake-quantized kernel
  r = ranges["conv1/kernel"]
  np.testing.assert_allclose(r["scale"], np.abs(params["conv1"]["kernel"]).max(axis=(0, 1, 2)) / 127, rtol=1e-6)
  assert np.all(r["zero_point"] == 128) and float(r["qmin"]) == 1.0  # narrow, int8 zero point 0


def test_rules_select_points_and_unmatched_rule_is_reported():
  cfg = fatq.QuantConfig((fatq.QuantRule("conv1/.*", fatq.QuantSpec(bits=4)), fatq.QuantRule(".*", None)))
  m, params, x = _lenet(cfg)
  stats = fatq.calibrate(m, params, [x])
  assert set(fatq.points(stats)) == {"conv1/kernel", "conv1/output"}
  names = fatq.point_names(m, x[:1])  # every point, quantized or not
  assert set(names) > {"conv1/kernel", "conv1/output", "fc3/kernel", "fc3/output"} and "conv1/output" in names
  cfg.check_matches(names)
  bad = fatq.QuantConfig((fatq.QuantRule("conv9/.*", fatq.QuantSpec()),))
  with pytest.raises(ValueError, match=r"'conv9/\.\*' matches no tensor"):
    bad.check_matches(names)
  # first match wins: a rule whose every tensor an earlier rule takes would never apply
  shadowed = fatq.QuantConfig((fatq.QuantRule(".*kernel", None), fatq.QuantRule("fc3/kernel", fatq.QuantSpec(4))))
  with pytest.raises(ValueError, match=r"rule 'fc3/kernel' never applies: every tensor it matches \(fc3/kernel\) "
                                       r"is matched first by '\.\*kernel'"):
    shadowed.check_matches(names)


def test_spec_validation_messages():
  with pytest.raises(ValueError, match="bits must be an integer in 2..16"):
    fatq.QuantSpec(bits=33)
  with pytest.raises(ValueError, match="bits must be an integer in 2..16"):
    fatq.QuantSpec(bits=0)
  with pytest.raises(ValueError, match="inverted"):
    fatq.QuantSpec(scale_bounds=(1.0, 0.5))
  with pytest.raises(ValueError, match="unknown quantization option"):
    fatq.QuantConfig.from_dict({"weigth_bits": 8})
  with pytest.raises(ValueError, match="not a valid regular expression"):
    fatq.QuantRule("conv(", None)
  # A factor starts at its calibrated value (scale 1, shift 0); bounds without it would clip it, untrained, forever.
  with pytest.raises(ValueError, match=r"scale_bounds = \(0.5, 0.9\) must contain 1.0"):
    fatq.QuantSpec(scale_bounds=(0.5, 0.9))
  with pytest.raises(ValueError, match=r"signed_shift_bounds = \(0.05, 0.4\) must contain 0.0"):
    fatq.QuantSpec(signed_shift_bounds=(0.05, 0.4))
  for field, value in (("symmetric", "false"), ("per_channel", "no"), ("trainable", 1), ("signed", "no")):
    with pytest.raises(ValueError, match=f"QuantSpec.{field} must be"):
      fatq.QuantSpec(**{field: value})
  with pytest.raises(ValueError, match="channel_axis must be an integer"):
    fatq.QuantSpec(channel_axis=1.0)
  with pytest.raises(ValueError, match=r"QuantRule '.\*kernel': the spec must be a QuantSpec or None"):
    fatq.QuantRule(".*kernel", {"bits": 4})
  with pytest.raises(ValueError, match=r"quantization rule 'conv1/.\*': unknown QuantSpec field\(s\) \['bitz'\]"):
    fatq.QuantConfig.from_dict({"rules": [("conv1/.*", {"bitz": 4})]})


def test_per_channel_axis_out_of_range_is_refused():
  # An axis past the kernel's rank used to wrap (axis 4 of a 4-D kernel gave one range per kernel row).
  fq = layers.FakeQuant(fatq.QuantSpec(bits=8, per_channel=True, channel_axis=4), weights=True)
  with pytest.raises(ValueError, match=r"channel_axis=4 is out of range for a tensor of shape \(3, 3, 8, 16\)"):
    fq.init(jax.random.key(0), jnp.ones((3, 3, 8, 16)))
  ok = layers.FakeQuant(fatq.QuantSpec(bits=8, per_channel=True, channel_axis=-4), weights=True)
  stats = ok.apply({}, jnp.ones((3, 3, 8, 16)), mutable=[layers.STATS])[1][layers.STATS]
  assert stats["max"].shape == (3,)


def test_thresholds_are_the_only_trainable_variables_and_move_the_range():
  m, params, x = _lenet(QCFG)
  stats = fatq.calibrate(m, params, [x])
  th = fatq.init_thresholds(m, params, stats, x)
  pts = fatq.points(th)
  assert set(pts["conv1/kernel"]) == {"scale"} and pts["conv1/kernel"]["scale"].shape == (6,)
  assert set(pts["conv1/output"]) == {"shift", "width"}
  # halving a symmetric weight factor halves that channel's range
  th2 = jax.tree.map(lambda a: a, th)
  th2["conv1"]["kernel_quant"]["scale"] = th["conv1"]["kernel_quant"]["scale"].at[0].set(0.5)
  r1 = fatq.quant_ranges(m, {"params": params, "quant_stats": stats, "quant": th}, x)["conv1/kernel"]
  r2 = fatq.quant_ranges(m, {"params": params, "quant_stats": stats, "quant": th2}, x)["conv1/kernel"]
  np.testing.assert_allclose(r2["hi"][0], 0.5 * r1["hi"][0], rtol=1e-6)
  np.testing.assert_allclose(r2["hi"][1:], r1["hi"][1:])


def test_loss_gradient_wrt_thresholds_matches_finite_differences():
  # Distillation loss as a function of one activation's FAT width factor, through the whole network. With 16-bit
  # grids the rounding error is negligible and the loss is smooth in the factor (the clipping of the range
  # dominates), so the STE gradient must equal the central finite difference.
  cfg = fatq.QuantConfig.uniform(None, fatq.QuantSpec.fat(16, symmetric=False))
  m, params, x = _lenet(cfg)
  stats = fatq.calibrate(m, params, [x])
  th = fatq.init_thresholds(m, params, stats, x)
  target = m.clone(quant=None).apply({"params": params}, x)

  def loss(width):
    t = jax.tree.map(lambda a: a, th)
    t["fc1"]["output_quant"]["width"] = width
    out = m.apply({"params": params, "quant_stats": stats, "quant": t}, x)
    return jnp.mean(jnp.square(out - target))

  w0, h = jnp.float32(0.6), 1e-3
  g = float(jax.grad(loss)(w0))
  fd = (float(loss(w0 + h)) - float(loss(w0 - h))) / (2 * h)
  assert g < 0  # widening a clipped range lowers the loss
  np.testing.assert_allclose(g, fd, rtol=0.05)


def test_asymmetric_unsigned_point_uses_unsigned_grid():
  spec = fatq.QuantSpec.fat(4, symmetric=False)
  fq = fatq.FakeQuant(spec)
  x = jnp.linspace(0.0, 3.0, 50)
  _, v = fq.apply({}, x, mutable=["quant_stats"])
  y, r = fq.apply(v, x, mutable=["quant_ranges"])
  assert float(r["quant_ranges"]["zero_point"]) == 0.0 and float(r["quant_ranges"]["qmin"]) == 0.0
  np.testing.assert_allclose(float(r["quant_ranges"]["scale"]), 3.0 / 15, rtol=1e-6)
  assert len(np.unique(np.asarray(y))) == 16
  np.testing.assert_allclose(y, Q.fake_quant(x, 0.0, 3.0, 4), atol=1e-7)


def test_asymmetric_per_channel_range_contains_zero():
  # A channel of one sign (common: a depthwise 3x3 channel has 9 weights) gets the range [0, max] (or [min, 0]), as
  # TFLite's converter chooses it; nudging [min, max] itself would shift it to end at 0 and clip the channel.
  spec = fatq.QuantSpec.fat(8, per_channel=True, symmetric=False)
  fq = fatq.FakeQuant(spec)
  w = jnp.stack([jnp.linspace(0.5, 1.0, 9), jnp.linspace(-2.0, -0.25, 9), jnp.linspace(-1.0, 3.0, 9)], axis=-1)
  _, v = fq.apply({}, w, mutable=["quant_stats"])
  y, r = fq.apply(v, w, mutable=["quant_ranges"])
  r = r["quant_ranges"]
  np.testing.assert_allclose(r["lo"], [0.0, -2.0, -1.0])
  np.testing.assert_allclose(r["hi"], [1.0, 0.0, 3.0])
  np.testing.assert_allclose(r["scale"], np.array([1.0, 2.0, 4.0]) / 255, rtol=1e-6)
  assert float(jnp.max(jnp.abs(y - w) / r["scale"])) <= 0.5 + 1e-4  # every weight within half a step


@pytest.mark.parametrize("per_channel", [False, True])
def test_mse_calibration_picks_the_weight_clip_of_least_squared_error(per_channel):
  """calibration='mse' on a heavy-tailed 4-bit kernel: the calibrated range is alpha* (min, max) per slice, alpha*
  the argmin of a numpy sum (Q(w) - w)^2 over 1.0, 0.99, ..., 0.2 on the narrow signed grid; a second calibration
  batch keeps it (a running min/max would widen it back to the full range); an activation rule with 'mse' is
  refused."""
  w = np.asarray(jax.random.t(jax.random.key(3), 3.0, (5, 5, 6, 16)), np.float32) * 0.1
  spec = fatq.QuantSpec.fat(4, per_channel=per_channel, calibration="mse")
  fq = fatq.FakeQuant(spec, weights=True)
  _, v = fq.apply({}, w, mutable=["quant_stats"])
  _, again = fq.apply(v, w, mutable=["quant_stats"])  # a second calibration batch sees the same weights
  axes = (0, 1, 2) if per_channel else None
  t_max = np.abs(w).max(axis=axes)
  errors = []
  for a in np.linspace(1.0, 0.2, 81):
    step = np.float32(a) * t_max / 7
    errors.append(np.sum((np.clip(np.round(w / step), -7, 7) * step - w) ** 2, axis=axes))
  errors = np.array(errors)
  alpha = np.linspace(1.0, 0.2, 81)[np.argmin(errors, axis=0)]  # the first of equal errors: the largest alpha
  for stats in (v, again):
    np.testing.assert_allclose(stats["quant_stats"]["max"], alpha * w.max(axis=axes), rtol=1e-5)
    np.testing.assert_allclose(stats["quant_stats"]["min"], alpha * w.min(axis=axes), rtol=1e-5)
  assert np.all(alpha < 1.0)  # a t(3) tail: clipping pays at 4 bits in every slice
  assert np.all(errors.min(axis=0) < errors[0]) and errors.min(axis=0).sum() < 0.85 * errors[0].sum()
  minmax = fatq.FakeQuant(dataclasses.replace(spec, calibration="minmax"), weights=True)
  fq_err = float(jnp.sum((fq.apply(v, w) - w) ** 2))
  mm_err = float(jnp.sum((minmax.apply(minmax.apply({}, w, mutable=["quant_stats"])[1], w) - w) ** 2))
  np.testing.assert_allclose(fq_err, errors.min(axis=0).sum(), rtol=1e-4)
  assert fq_err < 0.85 * mm_err


def _numpy_unsigned_errors(batches, t_max, bits, axes):
  """``sum (Q_a(x) - x)^2`` over ``batches`` for a = 1.0, 0.99, ..., 0.2 on the unsigned grid [0, a t_max]."""
  errors = []
  for a in np.linspace(1.0, 0.2, 81):
    step = np.float32(a) * t_max / (2 ** bits - 1)
    errors.append(sum(np.sum((np.clip(np.round(x / step), 0, 2 ** bits - 1) * step - x) ** 2, axis=axes)
                      for x in batches))
  return np.array(errors)


class _Activation(nn.Module):
  """One quantized activation point, ``act``."""
  spec: fatq.QuantSpec

  @nn.compact
  def __call__(self, x):
    return fatq.FakeQuant(self.spec, name="act_quant")(x)


@pytest.mark.parametrize("per_channel", [False, True])
def test_mse_calibration_of_activations_clips_the_range_of_least_error_over_all_batches(per_channel):
  """calibration='mse' on a 4-bit activation (ReLU of a heavy tail, so unsigned): the range is alpha* times the
  min/max over all calibration batches, alpha* the argmin of the squared error summed over all of them (a numpy
  reference). The first batch alone would pick another alpha*: the search sees every batch."""
  key = jax.random.key(5)
  scales = (1.0, 0.3, 0.3)  # a first batch with a wider spread than the others
  batches = [np.maximum(np.asarray(jax.random.t(k, 3.0, (6, 8, 8, 8)), np.float32) * s, 0)
             for k, s in zip(jax.random.split(key, 3), scales)]
  spec = fatq.QuantSpec.fat(4, per_channel=per_channel, calibration="mse")
  model = _Activation(spec)
  stats = fatq.calibrate(model, {}, batches)["act_quant"]
  axes = (0, 1, 2) if per_channel else None
  t_max = np.max([x.max(axis=axes) for x in batches], axis=0)
  candidates = np.linspace(1.0, 0.2, 81)
  errors = _numpy_unsigned_errors(batches, t_max, 4, axes)
  alpha = candidates[np.argmin(errors, axis=0)]
  np.testing.assert_allclose(stats["max"], alpha * t_max, rtol=1e-5)
  np.testing.assert_array_equal(stats["min"], np.zeros_like(t_max))
  assert np.all(alpha < 1.0) and errors.min(axis=0).sum() < 0.95 * errors[0].sum()
  first_only = candidates[np.argmin(_numpy_unsigned_errors(batches[:1], t_max, 4, axes), axis=0)]
  assert np.any(first_only != alpha)
  minmax = fatq.calibrate(_Activation(dataclasses.replace(spec, calibration="minmax")), {}, batches)["act_quant"]
  np.testing.assert_allclose(minmax["max"], t_max)
  quantized = sum(float(jnp.sum((model.apply({"quant_stats": {"act_quant": stats}}, x) - x) ** 2)) for x in batches)
  np.testing.assert_allclose(quantized, errors.min(axis=0).sum(), rtol=1e-4)


def _assert_outward_quantile(edge, values, q, width, upper=True):
  """``edge`` is the ``q``-quantile of ``values`` rounded outwards to a bin edge of ``width``: at most a bin away,
  with at least ``q`` of the values on its inner side (a tolerance of 1e-5 of a bin for float32 edges)."""
  exact = np.quantile(values, q, method="inverted_cdf")
  if upper:
    assert exact - 1e-5 * width <= edge <= exact + width * (1 + 1e-5), (edge, exact, width)
    assert np.mean(values <= edge + 1e-5 * width) >= q
  else:
    assert exact - width * (1 + 1e-5) <= edge <= exact + 1e-5 * width, (edge, exact, width)
    assert np.mean(values >= edge - 1e-5 * width) >= 1 - q


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_calibration_keeps_that_share_of_the_values_over_all_batches(per_channel, symmetric):
  """calibration='percentile' on an activation with heavy tails on both sides, over three batches: the range is the
  percentile of |x| (symmetric) or the (1 -+ p) / 2 quantiles of x (asymmetric) of all the batches' values together,
  a numpy reference, rounded outwards to the histogram's 2048 bins over the min/max range; p = 100 gives min/max."""
  keys = jax.random.split(jax.random.key(7), 3)
  batches = [np.asarray(jax.random.t(k, 2.0, (8, 16, 16, 4)), np.float32) * s + 0.5
             for k, s in zip(keys, (1.0, 0.3, 0.3))]
  values = np.concatenate([x.reshape(-1, 4) for x in batches])  # (n, channels)
  spec = fatq.QuantSpec.fat(8, symmetric=symmetric, per_channel=per_channel, calibration="percentile",
                            percentile=99.9)
  stats = fatq.calibrate(_Activation(spec), {}, batches)["act_quant"]
  slices = [values[:, c] for c in range(4)] if per_channel else [values.ravel()]
  for i, v in enumerate(slices):
    lo, hi = (np.asarray(stats[k]).reshape(-1)[i] for k in ("min", "max"))
    if symmetric:  # the range alpha (min, max), alpha = T / T_max
      t_max = np.abs(v).max()
      _assert_outward_quantile(max(-lo, hi), np.abs(v), 0.999, t_max / 2048)
      np.testing.assert_allclose(lo / v.min(), hi / v.max(), rtol=1e-6)
    else:
      width = (v.max() - v.min()) / 2048
      _assert_outward_quantile(hi, v, 0.9995, width)
      _assert_outward_quantile(lo, v, 0.0005, width, upper=False)
    assert hi < v.max() and (symmetric or lo > v.min())  # clipped: 6144 values a slice, 0.1 % of them out
  everything = fatq.calibrate(_Activation(dataclasses.replace(spec, percentile=100)), {}, batches)["act_quant"]
  minmax = fatq.calibrate(_Activation(dataclasses.replace(spec, calibration="minmax")), {}, batches)["act_quant"]
  for k in ("min", "max"):
    np.testing.assert_allclose(everything[k], minmax[k], rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_percentile_calibration_of_a_kernel_uses_the_kernel_itself(per_channel):
  w = np.asarray(jax.random.t(jax.random.key(3), 3.0, (5, 5, 6, 16)), np.float32) * 0.1
  fq = fatq.FakeQuant(fatq.QuantSpec.fat(4, per_channel=per_channel, calibration="percentile", percentile=99.0),
                      weights=True)
  _, v = fq.apply({}, w, mutable=["quant_stats"])
  _, again = fq.apply(v, w, mutable=["quant_stats"])  # a second calibration batch keeps it
  slices = [w[..., c].ravel() for c in range(16)] if per_channel else [w.ravel()]
  for i, x in enumerate(slices):
    t = max(-float(np.asarray(v["quant_stats"]["min"]).reshape(-1)[i]),
            float(np.asarray(v["quant_stats"]["max"]).reshape(-1)[i]))
    _assert_outward_quantile(t, np.abs(x), 0.99, np.abs(x).max() / 2048)
  jax.tree.map(np.testing.assert_array_equal, v, again)


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_calibration_clips_by_the_histogram_of_all_batches(symmetric):
  """calibration='entropy' on a 4-bit Laplacian activation, over three batches: the range is alpha* (min, max),
  alpha* the clipping factor of least divergence for the numpy histogram of all the batches' values together
  (``|x|`` on [0, T_max] with a signed symmetric grid's 7 steps; ``x`` on [min, max] with 15)."""
  keys = jax.random.split(jax.random.key(11), 3)
  batches = [np.asarray(jax.random.laplace(k, (8, 16, 16, 4)), np.float32) * s + 0.5
             for k, s in zip(keys, (1.0, 0.3, 0.3))]
  values = np.concatenate([x.ravel() for x in batches])
  stats = fatq.calibrate(_Activation(fatq.QuantSpec.fat(4, symmetric=symmetric, calibration="entropy")), {},
                         batches)["act_quant"]
  lo, hi, steps, seen = values.min(), values.max(), 15, values
  if symmetric:
    lo, hi, steps, seen = 0.0, np.abs(values).max(), 7, np.abs(values)

  def divergences_of(v):  # v's histogram on the range of all the values
    index = np.clip(np.floor((v - np.float32(lo)) / np.float32(hi - lo) * 2048), 0, 2047).astype(int)
    counts = np.bincount(index, minlength=2048).astype(np.float32)
    return np.asarray(Q.entropy_divergences(counts, lo, hi, layers.CLIP_FACTORS, steps))

  divergences = divergences_of(seen)
  alpha = float(np.asarray(stats["max"]) / values.max())
  np.testing.assert_allclose(float(np.asarray(stats["min"]) / values.min()), alpha, rtol=1e-6)
  chosen = np.argmin(np.abs(layers.CLIP_FACTORS - alpha))
  assert abs(layers.CLIP_FACTORS[chosen] - alpha) < 1e-6 and 0.2 < alpha < 1
  assert divergences[chosen] <= divergences.min() * (1 + 1e-6)
  assert np.argmin(divergences_of(seen[:batches[0].size])) != chosen  # the first batch alone: another choice


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_calibration_of_a_kernel_per_channel_uses_the_kernel_itself(symmetric):
  """Per channel, from the kernel itself: ``|w|`` on [0, max |w|] (7 steps of a signed symmetric 4-bit grid) or ``w``
  on its range widened to contain 0 (15 steps), as the grid is; four channels of one sign, as depthwise ones often
  are, whose windows clip towards 0."""
  # 4096 weights a channel: with a few hundred, the sparse histogram keeps every range whole
  w = np.asarray(jax.random.t(jax.random.key(3), 3.0, (8, 8, 64, 8)), np.float32) * 0.1
  w[..., :2], w[..., 2:4] = np.abs(w[..., :2]) + 0.05, -np.abs(w[..., 2:4])
  fq = fatq.FakeQuant(fatq.QuantSpec.fat(4, per_channel=True, symmetric=symmetric, calibration="entropy"), weights=True)
  _, v = fq.apply({}, w, mutable=["quant_stats"])
  _, again = fq.apply(v, w, mutable=["quant_stats"])  # a second calibration batch keeps it
  chosen = []
  for c in range(8):
    x = w[..., c].ravel()
    lo, hi, steps = (0.0, np.abs(x).max(), 7) if symmetric else (min(x.min(), 0), max(x.max(), 0), 15)
    seen = np.abs(x) if symmetric else x
    counts = np.bincount(np.clip(np.floor((seen - lo) / (hi - lo) * 2048), 0, 2047).astype(int), minlength=2048)
    d = np.asarray(Q.entropy_divergences(counts.astype(np.float32), lo, hi, layers.CLIP_FACTORS, steps))
    chosen.append(layers.CLIP_FACTORS[np.argmin(d)])
    for key, end in (("min", x.min()), ("max", x.max())):
      np.testing.assert_allclose(np.asarray(v["quant_stats"][key])[c], chosen[-1] * end, rtol=1e-6)
  assert min(chosen) < 1 and len(set(chosen)) > 1
  jax.tree.map(np.testing.assert_array_equal, v, again)


def test_fat_spec_bounds_by_variant_and_overridden():
  """The paper's bounds, the reference code's, and either with bounds of one's own (a TypeError before)."""
  assert fatq.QuantSpec.fat(4).scale_bounds == (0.5, 1.0)
  reference = fatq.QuantSpec.fat(4, variant="reference")
  assert (reference.scale_bounds, reference.signed_shift_bounds) == ((0.5, 1.3), (-0.2, 0.4))
  wide = fatq.QuantSpec.fat(4, variant="reference", scale_bounds=(0.5, 2.0), calibration="mse")
  assert (wide.scale_bounds, wide.signed_shift_bounds, wide.calibration) == ((0.5, 2.0), (-0.2, 0.4), "mse")
  # the reference code gives a tensor whose calibrated minimum is 0 (a ReLU output) one factor, the width (SPEC 2):
  # its range starts at 0 whatever the shift factor (it moved to -0.2 .. 0.4 of the width before); the paper's
  # shift moves it by up to 0.4 of the width
  relu_output = jnp.linspace(0.0, 1.0, 11)
  for variant, want in (("reference", (0.0, 1.2)), ("paper", (0.3, 1.3))):
    fq = fatq.FakeQuant(fatq.QuantSpec.fat(8, symmetric=False, variant=variant))
    _, v = fq.apply({}, relu_output, mutable=["quant_stats"])
    lo, hi, _ = fq.apply(v, method=lambda m: m.range(
        factor=lambda name, init, shape: jnp.full(shape, 0.3 if name == "shift" else 1.2)))
    np.testing.assert_allclose((float(lo), float(hi)), want, rtol=1e-6, atol=1e-7, err_msg=variant)
  # a factor of 1.8 now widens the calibrated range 1.8 times
  fq = fatq.FakeQuant(wide)
  x = jnp.linspace(0.0, 1.0, 11)
  _, v = fq.apply({}, x, mutable=["quant_stats"])
  lo, hi, _ = fq.apply(v, method=lambda m: m.range(factor=lambda name, init, shape: jnp.full(shape, 1.8)))
  np.testing.assert_allclose(float(hi - lo), 1.8, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown FAT variant 'papr'; choose 'paper' or 'reference'"):
    fatq.QuantSpec.fat(4, variant="papr")


def test_percentile_row_options_reach_both_specs():
  cfg = fatq.QuantConfig.from_dict(dict(weight_bits=4, act_bits=4, weight_calibration="percentile",
                                        act_calibration="percentile", percentile=99.5))
  for name in ("conv1/kernel", "conv1/output"):
    assert (cfg.spec_for(name).calibration, cfg.spec_for(name).percentile) == ("percentile", 99.5)
  assert fatq.QuantConfig.from_dict(dict(act_calibration="percentile")).spec_for("fc1/output").percentile == 99.99


def test_mse_calibration_option_reaches_the_weights_and_activations_and_is_validated(mnist, lenet_params):
  cfg = fatq.QuantConfig.from_dict(dict(weight_bits=4, act_bits=4, weight_calibration="mse"))
  assert cfg.spec_for("conv1/kernel").calibration == "mse" and cfg.spec_for("conv1/output").calibration == "minmax"
  both = fatq.QuantConfig.from_dict(dict(weight_bits=4, act_bits=4, act_calibration="mse"))
  assert both.spec_for("conv1/kernel").calibration == "minmax" and both.spec_for("conv1/output").calibration == "mse"
  # on LeNet-5: only the activation ranges move (each to at most its min/max), the kernels' stay their min/max
  xtr = mnist[0]
  batches = [xtr[i:i + 100] for i in range(0, 300, 100)]
  plain, clipped = (fatq.points(fatq.calibrate(LeNet5(quant=c), lenet_params, batches))
                    for c in (fatq.QuantConfig.from_dict(dict(weight_bits=4, act_bits=4)), both))
  assert plain.keys() == clipped.keys()
  for name in plain:
    ratio = np.asarray(clipped[name]["max"]) / np.asarray(plain[name]["max"])
    if name.endswith("kernel"):
      np.testing.assert_array_equal(ratio, 1.0)
    else:
      assert np.all((ratio >= 0.2 - 1e-6) & (ratio <= 1.0)), (name, ratio)
  assert any(np.all(np.asarray(clipped[n]["max"]) < np.asarray(plain[n]["max"])) for n in plain if "output" in n)
  with pytest.raises(ValueError,
                     match=r"QuantSpec.calibration must be one of \('minmax', 'mse', 'percentile', 'entropy'\), "
                           r"got 'l2'"):
    fatq.QuantSpec(calibration="l2")
  with pytest.raises(ValueError, match="calibration='mse' searches a uniform grid's range; kind='pot'"):
    fatq.QuantSpec(kind="pot", calibration="mse")


def test_learned_bias_offsets_fold_into_the_biases_and_get_the_bias_gradient():
  # learn_biases names layers: an offset per output channel (zero at the start) beside their FAT factors
  cfg = dataclasses.replace(QCFG, learn_biases="fc[12]")
  m, params, x = _lenet(cfg)
  params = jax.tree.map(lambda a: a + 0.05 * _rand(2, a.shape) if a.ndim == 1 else a, params)  # non-zero biases
  stats = fatq.calibrate(m, params, [x])
  th = fatq.init_thresholds(m, params, stats, x)
  offsets = layers.bias_offsets(th)
  assert {k: v.shape for k, v in offsets.items()} == {("fc1",): (120,), ("fc2",): (84,)}
  assert all(np.all(v == 0) for v in offsets.values())
  plain = m.clone(quant=QCFG)
  th_plain = fatq.init_thresholds(plain, params, stats, x)
  frozen = {"params": params, "quant_stats": stats}
  np.testing.assert_array_equal(m.apply({**frozen, "quant": th}, x), plain.apply({**frozen, "quant": th_plain}, x))

  # offsets move the output; folded into params/bias (and gone from quant) they give the same logits
  th2 = jax.tree.map(lambda a: a, th)
  th2["fc1"]["bias_offset"] = 0.2 * _rand(3, (120,))
  th2["fc2"]["bias_offset"] = 0.2 * _rand(4, (84,))
  v = {**frozen, "quant": th2}
  folded = layers.fold_biases(m, v, x[:1])
  assert not layers.bias_offsets(folded["quant"])
  np.testing.assert_array_equal(folded["params"]["fc1"]["bias"], params["fc1"]["bias"] + th2["fc1"]["bias_offset"])
  np.testing.assert_array_equal(folded["params"]["conv1"]["bias"], params["conv1"]["bias"])
  np.testing.assert_allclose(m.apply(folded, x), m.apply(v, x), rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(m.apply(v, x) - m.apply({**frozen, "quant": th}, x))) > 0.05
  assert layers.fold_biases(m, folded, x[:1]) is folded  # nothing left to fold

  # the loss gradient w.r.t. an offset is the one w.r.t. its bias, and (16-bit grids: smooth) the finite difference
  cfg16 = dataclasses.replace(fatq.QuantConfig.uniform(fatq.QuantSpec.fat(16), fatq.QuantSpec.fat(16, symmetric=False)),
                              learn_biases="fc3")
  m16 = m.clone(quant=cfg16)
  stats16 = fatq.calibrate(m16, params, [x])
  th16 = fatq.init_thresholds(m16, params, stats16, x)
  target = m.clone(quant=None).apply({"params": params}, x) + 0.3 * _rand(5, (16, 10))

  def loss(p, t):
    return jnp.mean(jnp.square(m16.apply({"params": p, "quant_stats": stats16, "quant": t}, x) - target))

  g_offset = jax.grad(loss, argnums=1)(params, th16)["fc3"]["bias_offset"]
  g_bias = jax.grad(loss)(params, th16)["fc3"]["bias"]
  np.testing.assert_allclose(g_offset, g_bias, rtol=1e-6)
  h = 1e-2
  for j in (0, 7):
    up, down = (jax.tree.map(lambda a: a, th16) for _ in range(2))
    up["fc3"]["bias_offset"] = up["fc3"]["bias_offset"].at[j].add(h)
    down["fc3"]["bias_offset"] = down["fc3"]["bias_offset"].at[j].add(-h)
    fd = (float(loss(params, up)) - float(loss(params, down))) / (2 * h)
    np.testing.assert_allclose(g_offset[j], fd, rtol=0.02)
  assert np.max(np.abs(g_offset)) > 1e-3


def test_quant_ranges_compile_once_per_model_and_read_the_variables_given():
  """The ranges' program is kept for an equal model; what it returns follows the statistics of each call."""
  from fatq import calibration

  m, params, x = _lenet(QCFG)
  stats = fatq.calibrate(m, params, [x])
  v = {"params": params, "quant_stats": stats, "quant": fatq.init_thresholds(m, params, stats, x[:1])}
  first = fatq.quant_ranges(m, v, x[:1])
  compiled = calibration._ranges_program.cache_info().misses
  wider = dict(v, quant_stats=jax.tree.map(lambda a: 2 * a, stats))  # every range twice as wide
  again = fatq.quant_ranges(LeNet5(quant=QCFG), wider, x[:1])  # an equal model: the same program
  assert calibration._ranges_program.cache_info().misses == compiled
  assert list(again) == list(first) and len(first) > 10  # the network's order, kernels and outputs
  for name, r in first.items():
    np.testing.assert_allclose(again[name]["scale"], 2 * r["scale"], rtol=1e-6, err_msg=name)


def test_activation_histograms_count_every_value_and_draw_both_ranges(tmp_path):
  from fatq import plots

  m, params, x = _lenet(QCFG)
  stats = fatq.calibrate(m, params, [x])
  th = fatq.init_thresholds(m, params, stats, x[:1])
  moved = jax.tree.map(lambda a: a * 0.8 + 0.05, th)  # widths 0.85, shifts 0.05: every range moves
  before, after = ({"params": params, "quant_stats": stats, "quant": t} for t in (th, moved))
  hists = plots.activation_histograms(m, before, after, x, bins=50)
  acts = plots._activations(m, params, x)
  assert set(hists) == set(acts) and "conv1/output" in hists and not any(n.endswith("kernel") for n in hists)
  for name, h in hists.items():
    a = np.asarray(acts[name])
    assert h["counts"].shape == (50,) and h["counts"].sum() == a.size  # every value in a bin
    for key, variables in (("before", before), ("after", after)):
      r = fatq.quant_ranges(m, variables, x[:1])[name]
      np.testing.assert_array_equal(h[key], ((r["qmin"] - r["zero_point"]) * r["scale"],
                                             (r["qmax"] - r["zero_point"]) * r["scale"]))
      assert h["edges"][0] <= min(a.min(), h[key][0]) and h["edges"][-1] >= max(a.max(), h[key][1])
    assert h["before"][1] != h["after"][1]
  out = tmp_path / "ranges.png"
  plots.plot_activation_ranges(m, before, after, x, str(out))
  assert out.stat().st_size > 10_000


def test_plots_of_weight_only_rows_and_of_bias_offsets(tmp_path, monkeypatch):
  from fatq import plots

  # weights alone quantized: no activation panel to draw (plt.subplots(0, 6) used to raise after fine-tuning)
  m, params, x = _lenet(fatq.QuantConfig.uniform(fatq.QuantSpec.fat(4), None))
  stats = fatq.calibrate(m, params, [x])
  v = {"params": params, "quant_stats": stats, "quant": fatq.init_thresholds(m, params, stats, x[:1])}
  assert plots.plot_activation_ranges(m, v, v, x, str(tmp_path / "none.png")) == []
  assert not (tmp_path / "none.png").exists()
  # the factor panel draws FAT factors only: bias offsets are in the biases' units
  figures = []
  monkeypatch.setattr(plots.plt, "close", figures.append)
  factors = {"conv1/kernel": {"scale": 1.0}, "conv1": {"bias_offset": 0.3}, "input": {"shift": 0.0, "width": 1.0}}
  plots.plot_training([dict(step=s, holdout_loss=1.0 / (s + 1), factors=factors) for s in range(3)],
                      str(tmp_path / "training.png"))
  labels = [line.get_label() for line in figures[0].axes[1].lines]
  assert labels == ["conv1/kernel:scale", "input:shift", "input:width"]
  colours = [line.get_color() for line in figures[0].axes[1].lines]
  assert len(set(colours)) == 3


def test_activation_plot_follows_the_network_from_input_to_logits(tmp_path):
  from fatq import plots

  m = mobilenet_v2.tiny(quant=QCFG)
  x = np.asarray(jax.random.uniform(jax.random.key(0), (4, 32, 32, 3)))
  params = m.init(jax.random.key(1), x)["params"]
  stats = fatq.calibrate(m, params, [x])
  v = {"params": params, "quant_stats": stats, "quant": fatq.init_thresholds(m, params, stats, x[:1])}
  order = [n for n in fatq.quant_ranges(m, v, x[:1]) if not n.endswith("kernel")]  # applied op by op: network order
  assert order[:3] == ["input", "conv1/output", "block0/depthwise/output"] and order[-1] == "logits/output"
  assert list(plots.activation_histograms(m, v, v, x, bins=10)) == order  # not the sorted order of a jitted output
  drawn = plots.plot_activation_ranges(m, v, v, x, str(tmp_path / "all.png"))
  assert drawn == order
  drawn = plots.plot_activation_ranges(m, v, v, x, str(tmp_path / "some.png"), max_points=5)
  gaps = np.diff([order.index(n) for n in drawn])
  assert len(drawn) == 5 and drawn[0] == "input" and drawn[-1] == "logits/output"
  assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # in network order, evenly spread


def test_batch_norm_folding_with_a_conv_bias():
  rng = np.random.default_rng(0)
  k = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
  b, gamma, beta, mean = (rng.normal(size=4).astype(np.float32) for _ in range(4))
  var = rng.uniform(0.1, 2.0, 4).astype(np.float32)
  kf, bf = fatq.fold_batch_norm(k, b, gamma, beta, mean, var, eps=1e-3)
  x = rng.normal(size=(5, 2 * 3 * 3)).astype(np.float64)  # a conv at one position is a dense layer
  y = x @ k.reshape(-1, 4) + b
  want = (y - mean) * gamma / np.sqrt(var + 1e-3) + beta
  np.testing.assert_allclose(x @ kf.reshape(-1, 4) + bf, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [1, -1])
def test_calibration_min_and_max_are_over_every_batch_whichever_holds_them(order):
  """Running min/max of an activation over batches: the global minimum in one batch, the maximum in another, in
  either order (the LeNet test checks a minimum that its last batch happens to hold)."""
  spec = fatq.QuantSpec.fat(8, symmetric=False)
  fq = fatq.FakeQuant(spec)
  batches = [jnp.linspace(-3.0, 1.0, 12), jnp.linspace(-1.0, 5.0, 12)][::order]
  v = {}
  for b in batches:
    _, v = fq.apply(v, b, mutable=["quant_stats"])
  assert float(v["quant_stats"]["min"]) == -3.0 and float(v["quant_stats"]["max"]) == 5.0
