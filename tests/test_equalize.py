"""Data-free quantization (fatq/equalize.py): cross-layer equalization keeps the float function and evens out the
channel ranges; bias correction removes the mean output shift of quantized weights; the experiment rows."""

from __future__ import annotations

import json

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import fatq
from fatq import equalize, experiment, layers, models
from fatq.config import QuantConfig, QuantRule, QuantSpec
from fatq.data import data_root, imagenet
from fatq.layers import RELU6_BOUND, QConv, QDense
from fatq.models import mnasnet, mobilenet_v1, mobilenet_v2

TINY = {"mobilenet_v1": mobilenet_v1.tiny, "mobilenet_v2": mobilenet_v2.tiny, "mnasnet": mnasnet.tiny}
MODELS = data_root() / "models"
REAL = {  # the shared checkpoints (data README): Keras MobileNet v1 0.75, dequantized TFLite MobileNet v2 1.0
    "mobilenet_v1": dict(name="mobilenet_v1", width=0.75, num_classes=1000, impl="fast", checkpoint_format="tfjs",
                         checkpoint=str(MODELS / "mobilenet_v1_0.75_224_keras_tfjs")),
    "mobilenet_v2": dict(name="mobilenet_v2", width=1.0, num_classes=1001, impl="fast", checkpoint_format="tflite",
                         checkpoint=str(MODELS / "mobilenet_v2_1.0_224_ptq_int8.tflite")),
}


@pytest.fixture(scope="module")
def images32():
  """16 real ImageNet validation images at 32x32 (the tiny models' size)."""
  return imagenet.val_set("fat", 32, limit=16).images


def init(model, x, seed=0):
  """Random params of the right structure, LeCun-normal, small biases: numpy, without compiling ``model.init``
  (a minute on two busy cores)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x[:1])["params"]

  def draw(leaf):
    if len(leaf.shape) == 1:
      return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree.map(draw, shapes)


def forward(model):
  f = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return lambda p, x: np.asarray(f(p, x))


def relu_model(name, **kwargs):
  m = TINY[name](**kwargs)
  return m.clone(relu6_clip=False) if hasattr(m, "relu6_clip") else m


def uneven(params, seed=0):
  """Multiply each conv output channel by exp(N(0, 1)): channel ranges spread over ~2 decades, as after folding
  a batch norm."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda w: np.asarray(w) * np.exp(rng.normal(size=w.shape[-1:])).astype(np.float32)
                      if w.ndim == 4 else np.asarray(w), params)


def spreads(params, paths):
  layers = equalize._layer_params(params)
  return {p: equalize._spread(layers[p]["kernel"]) for p in paths}


@pytest.mark.parametrize("name", sorted(TINY))
def test_cle_keeps_the_float_function_and_evens_the_channel_ranges(name, images32):
  model = relu_model(name)
  params = uneven(init(model, images32))
  new, report = equalize.equalize(model, params, images32.shape[1:])
  f = forward(model)
  y0, y1 = f(params, images32), f(new, images32)
  assert np.max(np.abs(y1 - y0)) <= 1e-4 * np.max(np.abs(y0))
  assert report["last_change"] <= 1e-6 and report["sweeps"] < 100
  assert report["float_change"] <= 1e-5  # the check equalize makes on random images
  depthwise = [p for p in report["spread"] if p.endswith("depthwise")]
  before, after = spreads(params, depthwise), spreads(new, depthwise)
  # the worst max/median ratio of a depthwise kernel's channel ranges drops at least 2x
  assert max(before.values()) > 5 and max(after.values()) < max(before.values()) / 2, (before, after)
  # every rescaled pair now has equal ranges on both sides: r1_i = r2_i
  layers = equalize._layer_params(new)
  kinds = {layer.path: layer.kind for layer in equalize.layer_calls(model, new, images32.shape[1:])}
  for a, b in report["pairs"]:
    r1 = equalize.channel_ranges(layers[a]["kernel"], -1)
    r2 = equalize.channel_ranges(layers[b]["kernel"], equalize._in_axis(kinds[b]))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)


def test_pairs_follow_the_architecture():
  v2 = relu_model("mobilenet_v2")  # blocks 2 and 4 add their input
  params = init(v2, np.zeros((1, 32, 32, 3), np.float32))
  pairs, skipped = equalize.pairs(v2, params, (32, 32, 3))
  got = {(p.a, p.b) for p in pairs}
  assert {("conv1", "block0/depthwise"), ("block0/depthwise", "block0/project"), ("block1/expand", "block1/depthwise"),
          ("block0/project", "block1/expand"), ("head", "logits")} <= got
  assert ("block1/project", "block2/expand", "a residual add reads the tensor between them") in skipped
  assert equalize.residual_blocks(v2, (32, 32, 3)) == {"block2", "block4"}
  assert [p.b_kind for p in pairs if p.b == "logits"] == ["dense"]  # through the global average pool

  # With ReLU6 the same pairs, each ReLU6 layer with a per-channel bound 6 / s: the float function stays exact,
  # with channels that do reach the bound (the inputs are scaled up so that many do).
  v2_relu6 = mobilenet_v2.tiny()
  params = uneven(params)
  pairs6, _ = equalize.pairs(v2_relu6, params, (32, 32, 3))
  assert {(p.a, p.b) for p in pairs6} == got
  x = 4 * np.asarray(jax.random.normal(jax.random.key(1), (4, 32, 32, 3)))
  new, _ = equalize.equalize(v2_relu6, params, (32, 32, 3))
  bound = new["conv1"][RELU6_BOUND]
  assert bound.shape == (params["conv1"]["kernel"].shape[-1],) and np.ptp(bound) > 1.0  # a bound per channel
  assert RELU6_BOUND not in new["block0"]["project"]  # no activation, no bound
  capture = jax.jit(lambda p, x: v2_relu6.apply({"params": p}, x, capture_intermediates=True))
  y0, state = capture(params, x)
  assert float(jnp.mean(state["intermediates"]["conv1"]["__call__"][0] == 6.0)) > 0.01  # ReLU6 clips here
  y1, _ = capture(new, x)
  assert np.max(np.abs(np.asarray(y1 - y0))) <= 1e-4 * np.max(np.abs(np.asarray(y0)))
  # and the model with ReLU instead (equalize='relu') has no bounds
  relu_new, _ = equalize.equalize(v2, params, (32, 32, 3))
  assert RELU6_BOUND not in relu_new["conv1"]


def test_equalize_says_why_nothing_can_be_rescaled():
  class Tanh(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = QDense(8, activation="tanh", name="fc1")(x.reshape(x.shape[0], -1))
      return QDense(4, name="fc2")(x)

  model = Tanh()
  x = np.zeros((1, 4, 4, 1), np.float32)
  with pytest.raises(ValueError, match="no pair of layers it can rescale.*fc1 -> fc2: tanh is not positive-homogeneous"):
    equalize.equalize(model, init(model, x), (4, 4, 1))


def test_equalize_refuses_a_model_whose_adds_it_cannot_see():
  # a residual written as a plain "+" (no '<block>/add' point): pairs() pairs a -> b across it, which changed the
  # outputs by a third without a word; the float outputs are compared and the model refused
  class PlainAdd(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = QConv(8, (3, 3), activation="relu", name="a")(x)
      return QConv(8, (1, 1), name="b")(h) + h

  model = PlainAdd()
  x = np.zeros((1, 6, 6, 3), np.float32)
  params = uneven(init(model, x))
  assert equalize.pairs(model, params, (6, 6, 3))[0] == [equalize.Pair("a", "b", "conv", "relu")]
  with pytest.raises(ValueError, match=r"changed PlainAdd's float outputs by 0\.\d+.*leave equalization off"):
    equalize.equalize(model, params, (6, 6, 3))


def test_bias_correction_and_calibration_refuse_or_skip_bad_batches():
  model = OneLayer("conv")
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
  params = init(model, x)
  with pytest.raises(ValueError, match="needs the quantized model.*quant=None"):  # was an AttributeError
    equalize.correct_bias(model, params, [x])
  # a zero-length batch adds nothing (it raised from inside numpy and the model before)
  qmodel = model.clone(quant=QuantConfig.uniform(QuantSpec(4, per_channel=False), None))
  with_empty, _ = equalize.correct_bias(qmodel, params, [x[:2], x[:0], x[2:]])
  without, _ = equalize.correct_bias(qmodel, params, [x[:2], x[2:]])
  np.testing.assert_array_equal(with_empty["layer"]["bias"], without["layer"]["bias"])
  stats = [fatq.calibrate(qmodel.clone(quant=QuantConfig.uniform(QuantSpec(8), QuantSpec(8))), params, batches)
           for batches in ([x[:0], x], [x])]
  jax.tree.map(np.testing.assert_array_equal, *stats)


def test_dead_channel_keeps_its_scale(images32):
  """A channel whose weights are ~0 (batch norm with gamma ~0) outputs relu(bias): rescaling it by
  sqrt(1e-12 / r2) would blow that constant up a million times, and the layer's activation range with it."""
  model = relu_model("mobilenet_v1")
  params = jax.tree.map(np.array, init(model, images32))  # writable copies
  params["conv1"]["kernel"][..., 0] = 1e-12
  params["conv1"]["bias"][0] = 1.0
  new, _ = equalize.equalize(model, params, images32.shape[1:])
  assert new["conv1"]["bias"][0] == 1.0  # the output 1.0 stays 1.0
  f = jax.jit(lambda p, x: model.apply({"params": p}, x, capture_intermediates=True))
  (y0, _), (y1, state) = f(params, images32), f(new, images32)
  assert float(jnp.max(state["intermediates"]["conv1"]["__call__"][0][..., 0])) == 1.0
  assert float(jnp.max(jnp.abs(y1 - y0))) <= 1e-4 * float(jnp.max(jnp.abs(y0)))


def test_scales_of_channels_that_carry_nothing():
  r1 = np.array([1.0, 4.0, 0.0, 0.0, 5.0, 0.5])  # A's output-channel ranges; channels 2 and 3 dead
  r2 = np.array([4.0, 1.0, 3.0, 3.0, 0.0, 0.0])  # B's input-channel ranges; B ignores channels 4 and 5
  bias = np.array([0.5, 0.5, -1.0, 1.0, 0.5, 0.5])  # after ReLU channel 2 outputs 0, channel 3 outputs 1
  s = equalize.scales(r1, r2, bias, "relu")
  # paper sqrt(r1 / r2); silent channel 2: B gets the median live range 2.5; constant channel 3: untouched;
  # ignored channels: A's range comes down to the median live range 2.5 (channel 4), never up (channel 5)
  np.testing.assert_allclose(s, [0.5, 2.0, 2.5 / 3.0, 1.0, 5.0 / 2.5, 1.0])
  # without an activation only a zero bias makes a dead channel silent
  np.testing.assert_allclose(equalize.scales(r1, r2, bias, "none")[2], 1.0)


def test_channel_that_the_next_layer_ignores_no_longer_sets_the_range(images32):
  """MobileNet v2's int8 checkpoint has depthwise channels of range 34 (the others ~0.5) whose output the project
  layer multiplies by exact zeros: equalization brings them to the median range, the function stays the same."""
  model = relu_model("mobilenet_v1")
  params = jax.tree.map(np.array, init(model, images32))  # writable copies
  params["block2"]["pointwise"]["kernel"][:, :, 0, :] = 0.0  # ignores block2/depthwise channel 0
  params["block2"]["depthwise"]["kernel"][..., 0] *= 100.0  # ... whose weights are large
  new, report = equalize.equalize(model, params, images32.shape[1:])
  before, after = report["spread"]["block2/depthwise"]
  assert before > 50 and after < 2, (before, after)
  f = forward(model)
  y0, y1 = f(params, images32), f(new, images32)
  assert np.max(np.abs(y1 - y0)) <= 1e-4 * np.max(np.abs(y0))


@pytest.mark.parametrize("name", sorted(REAL))
def test_cle_on_real_weights(name):
  """The shared checkpoints: the same logits after equalization (16 real 224x224 images), and the
  depthwise channel ranges much closer to each other."""
  cfg = REAL[name]
  if not (MODELS / cfg["checkpoint"]).exists():
    pytest.skip(f"no {cfg['checkpoint']}")
  model, params, _ = models.load(cfg)  # ReLU6: equalized with per-channel bounds
  x = imagenet.val_set("fat", 224, limit=16).images
  new, report = equalize.equalize(model, params, x.shape[1:])
  f = forward(model)
  y0, y1 = f(params, x), f(new, x)
  assert np.max(np.abs(y1 - y0)) <= 1e-5 * np.max(np.abs(y0))
  assert np.array_equal(y0.argmax(1), y1.argmax(1))
  depthwise = [p for p in report["spread"] if p.endswith("depthwise")]
  before, after = spreads(params, depthwise), spreads(new, depthwise)
  geo = lambda d: float(np.exp(np.mean(np.log(list(d.values())))))
  # max/median channel range of the depthwise kernels, geometric mean over the layers and the worst layer;
  # measured: v1 18.3 -> 1.6 and 101 -> 2.0, v2 9.0 -> 2.0 and 36 -> 8.9
  assert geo(before) > 8 and geo(after) < geo(before) / 4, (geo(before), geo(after))
  assert max(after.values()) < max(before.values()) / 4


def test_bias_correction_removes_the_mean_output_shift_on_real_data():
  """MobileNet v1 (Keras weights), kernels at 8 bits per tensor, corrected on 16 unlabeled images and checked on 16
  other (validation) images, all at 64x64: the mean error of every layer's pre-activation output (E over images
  and positions, per channel, on the float inputs) shrinks."""
  cfg = REAL["mobilenet_v1"]
  if not (MODELS / cfg["checkpoint"]).exists():
    pytest.skip(f"no {cfg['checkpoint']}")
  model, params, _ = models.load(cfg)
  calib = imagenet.unlabeled_set("fat", 64, limit=16).images
  held_out = imagenet.val_set("fat", 64, limit=16).images
  qmodel = model.clone(quant=QuantConfig.uniform(QuantSpec(8, per_channel=False), QuantSpec(8)))
  new, corrections = equalize.correct_bias(qmodel, params, [calib[:8], calib[8:]])
  assert len(corrections) == 28  # 27 convs and the logits

  wq = equalize.quantized_kernels(qmodel, params, calib[:1])
  layers = equalize._layer_params(params)
  deltas = {p: w - np.asarray(layers[p]["kernel"]) for p, w in wq.items()}
  shift_calib = equalize.output_shift(model, params, deltas, [calib[:8], calib[8:]])  # batches of 8: one compile
  shift_held_out = equalize.output_shift(model, params, deltas, [held_out[:8], held_out[8:]])
  correction = {p: np.asarray(layers[p]["bias"], np.float64) - np.asarray(equalize._layer_params(new)[p]["bias"])
                for p in deltas}
  # on the images it was computed from, the correction is exactly the shift
  for p in deltas:
    np.testing.assert_allclose(correction[p], shift_calib[p], rtol=1e-4, atol=1e-6)
  before = np.mean([np.mean(np.abs(shift_held_out[p])) for p in deltas])
  after = np.mean([np.mean(np.abs(shift_held_out[p] - correction[p])) for p in deltas])
  assert after < before / 4, (before, after)  # measured: 0.151 -> 0.016
  # the depthwise layers, where per-tensor ranges hurt most, carry the largest shifts
  worst = max(deltas, key=lambda p: np.mean(np.abs(shift_held_out[p])))
  assert worst.endswith("depthwise"), worst


class OneLayer(nn.Module):
  """One QConv (3x3, stride 2, SAME: border taps meet padding) or QDense named ``layer``, for bias-correction
  checks where the layer's input is the float input."""

  kind: str = "conv"
  quant: QuantConfig | None = None

  @nn.compact
  def __call__(self, x):
    if self.kind == "dense":
      return QDense(16, quant=self.quant, name="layer")(x.reshape(x.shape[0], -1))
    groups = x.shape[-1] if self.kind == "depthwise" else 1
    return QConv(x.shape[-1] if groups > 1 else 16, (3, 3), (2, 2), groups=groups, quant=self.quant,
                 name="layer")(x)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_tracked_bias_correction_keeps_the_mean_output_as_the_weight_grid_moves(kind):
  """4-bit per-channel kernels, statically bias-corrected (fatq.equalize.correct_bias), then the FAT scale factors
  moved to random values in [0.5, 1]: with ``track_bias_correction`` the layer's mean output over the calibration
  images (float inputs, per channel) stays the float layer's; without it the correction goes stale. At the
  calibrated thresholds the two are the same model, bit for bit; folded, the tracked model is unchanged."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(12, 9, 9, 6)) + rng.uniform(0, 2, 6)).astype(np.float32)  # non-zero channel means
  weights = QuantSpec.fat(4, per_channel=True)
  static = QuantConfig((QuantRule(r".*kernel", weights), QuantRule(".*", None)))
  tracked = dataclasses.replace(static, track_bias_correction=True)
  model = OneLayer(kind)
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)
  corrected, _ = equalize.correct_bias(model.clone(quant=static), params, [x[:5], x[5:]])
  models = {"static": model.clone(quant=static), "tracked": model.clone(quant=tracked)}
  stats = {k: fatq.calibrate(m, corrected, [x[:5], x[5:]]) for k, m in models.items()}  # batches of 5 and 7
  assert "input_mean" not in stats["static"]["layer"]
  assert stats["tracked"]["layer"]["input_count"] == (12 if kind == "dense" else 12 * 5 * 5)
  th = fatq.init_thresholds(models["tracked"], corrected, stats["tracked"], x[:1])
  moved = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.0, a.shape), a.dtype), th)
  out = lambda k, t: np.asarray(models[k].apply({"params": corrected, "quant_stats": stats[k], "quant": t}, x))
  channel_mean = lambda y: y.reshape(-1, y.shape[-1]).mean(0)
  np.testing.assert_array_equal(out("tracked", th), out("static", th))
  float_mean = channel_mean(np.asarray(model.apply({"params": params}, x)))
  scale = np.mean(np.abs(float_mean))
  # the static correction makes the calibrated grid's mean output the float one (float32 sums: ~1e-6)
  assert np.max(np.abs(channel_mean(out("static", th)) - float_mean)) < 1e-5 * scale
  tracked_error = np.max(np.abs(channel_mean(out("tracked", moved)) - float_mean))
  stale_error = np.max(np.abs(channel_mean(out("static", moved)) - float_mean))
  assert tracked_error < 1e-5 * scale, (tracked_error, scale)  # measured: 0.6e-6 - 1.2e-6
  assert stale_error > 0.1 * scale, (stale_error, scale)  # measured: 0.43, 0.69, 0.66 of the mean size

  v = {"params": corrected, "quant_stats": stats["tracked"], "quant": moved}
  folded = layers.fold_biases(models["tracked"], v, x[:1])
  assert set(folded["quant_stats"]["layer"]) == {"kernel_quant"}
  np.testing.assert_allclose(models["tracked"].apply(folded, x), out("tracked", moved), rtol=1e-6, atol=1e-6)


def test_tracked_bias_correction_needs_a_uniform_weight_grid():
  x = np.ones((2, 9, 9, 6), np.float32)
  pot = QuantConfig((QuantRule(r".*kernel", QuantSpec(bits=4, kind="pot")), QuantRule(".*", None)),
                    track_bias_correction=True)
  model = OneLayer("conv", quant=pot)
  with pytest.raises(ValueError, match=r"layer/kernel: track_bias_correction follows a uniform weight grid; this "
                     r"kernel's is kind='pot'"):
    fatq.calibrate(model, model.clone(quant=None).init(jax.random.key(0), x)["params"], [x])


def tiny_run(tmp_path, rows):
  rng = np.random.default_rng(0)
  x = imagenet.val_set("fat", 32, limit=16).images
  x = np.concatenate([x, rng.uniform(-1, 1, (24, 32, 32, 3)).astype(np.float32)])
  model = mobilenet_v1.tiny()
  params = uneven(init(model, x))
  data = experiment.Data(train=x[:8], calibration=x[8:24], holdout=x[:8], eval_images=x[24:],
                         eval_labels=rng.integers(0, 10, 16).astype(np.int32))
  cfg = ml_collections.ConfigDict(dict(seed=0, model=dict(name="tiny"), data=dict(name="mixed"),
                                       calibration=dict(batch_size=8), input_bits=8, rows=rows, eval_batch_size=16))
  return cfg, model, params, data


def test_experiment_rows_with_equalize(tmp_path):
  rows = [dict(weight_bits=8, act_bits=8), dict(weight_bits=8, act_bits=8, equalize=True),
          dict(weight_bits=8, act_bits=8, equalize=True, bias_correction=False),
          dict(weight_bits=8, act_bits=8, bias_correction=True), dict(weight_bits=8, act_bits=8, equalize="relu")]
  cfg, model, params, data = tiny_run(tmp_path, rows)
  assert [experiment.row_name(r) for r in rows] == ["W8A8-tensor-sym", "W8A8-tensor-sym-cle",
                                                     "W8A8-tensor-sym-cle-nobc", "W8A8-tensor-sym-bc",
                                                     "W8A8-tensor-sym-cle-relu"]
  assert experiment.quant_config(rows[1]) == experiment.quant_config(rows[0])  # the keys are not quantizer options
  results = experiment.run(cfg, model, params, data, str(tmp_path), progress=False, log=lambda *_: None)
  saved = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
  assert set(saved) == {"float", *[experiment.row_name(r) for r in rows]}
  cle = saved["W8A8-tensor-sym-cle"]
  assert cle["equalize"] == dict(pairs=7, skipped=0, sweeps=cle["equalize"]["sweeps"], relu6_to_relu=False)
  assert 1 < cle["equalize"]["sweeps"] < 100  # converged (tol 1e-6) before the cap of 100 sweeps
  assert saved["W8A8-tensor-sym-cle-relu"]["equalize"]["relu6_to_relu"]
  assert cle["bias_correction"]["layers"] == 8 and "bias_correction" not in saved["W8A8-tensor-sym-cle-nobc"]
  assert "equalize" not in saved["W8A8-tensor-sym-bc"] and saved["W8A8-tensor-sym-bc"]["bias_correction"]
  # equalization with per-channel ReLU6 bounds keeps the float model (so do ReLU and ReLU6 here: the tiny model's
  # activations stay below 6 on these images)
  assert cle["equalized_float"]["agreement"] == 1.0
  assert saved["W8A8-tensor-sym-cle-relu"]["equalized_float"]["agreement"] == 1.0
  assert len(results["rows"]) == 6


def test_equalize_keys_are_checked():
  cfg = ml_collections.ConfigDict(dict(rows=[dict(weight_bits=8, equalize="yes")]))
  with pytest.raises(ValueError, match=r"rows\[0\].*equalize must be one of \(False, True, 'relu'\)"):
    experiment.check_config(cfg)
  cfg = ml_collections.ConfigDict(dict(rows=[dict(weight_bits=0, act_bits=8, equalize=True)]))
  with pytest.raises(ValueError, match=r"rows\[0\].*bias_correction .* needs weight_bits"):
    experiment.check_config(cfg)
  cfg = ml_collections.ConfigDict(dict(rows=[dict(weight_bits=4, bias_correction="track")]))
  with pytest.raises(ValueError, match=r"rows\[0\].*bias_correction must be one of \(False, True, 'tracked'\), "
                     r"got 'track'"):
    experiment.check_config(cfg)
  tracked = dict(weight_bits=4, act_bits=8, per_channel=True, act_symmetric=False, bias_correction="tracked")
  assert experiment.row_name(tracked) == "W4A8-channel-symW-asymA-bc-tracked"
  cle_tracked = dict(weight_bits=8, equalize=True, bias_correction="tracked")
  assert experiment.row_name(cle_tracked) == "W8A8-tensor-sym-cle-tracked"
  assert experiment.quant_config(tracked).track_bias_correction
  assert not experiment.quant_config({**tracked, "bias_correction": True}).track_bias_correction


def test_export_refuses_per_channel_relu6_bounds():
  pytest.importorskip("tensorflow")
  from fatq import export

  model = mobilenet_v2.tiny()
  x = np.zeros((1, 32, 32, 3), np.float32)
  new, _ = equalize.equalize(model, uneven(init(model, x)), (32, 32, 3))
  with pytest.raises(export.ExportError, match=r"layer 'block0/depthwise' \(and \d+ more\) ends in a ReLU6 with a "
                     r"bound per channel.*equalize='relu'"):
    export.Exported(model, {"params": new}, x)
