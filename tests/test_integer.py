"""fatq.integer: TFLite's integer kernels in JAX, bit for bit against the interpreter (reference and XNNPACK kernels)."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fatq
from fatq import export as E
from fatq.integer import (IntegerModel, UnsupportedOpError, divide_round_half_away, multiply_by_quantized_multiplier,
                          quantize_multiplier)
from fatq.layers import integer_arithmetic
from fatq.models import LeNet5

PER_CHANNEL = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(8, per_channel=True), fatq.QuantSpec.fat(8, symmetric=False))
# the input image stays at 8 bits, as in the configs (a 4-bit input quantizer is not exported as an int8 input)
W4A4_TENSOR = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(4), fatq.QuantSpec.fat(4, symmetric=False),
                                       extra=[fatq.QuantRule("input", fatq.QuantSpec.fat(8, symmetric=False))])


def mbqm(x, m, single_rounding=False):
  with jax.enable_x64(True):
    q, e = quantize_multiplier(np.broadcast_to(m, np.shape(x)))
    return np.asarray(multiply_by_quantized_multiplier(np.asarray(x, np.int64), q, e, single_rounding))


def test_quantize_multiplier():
  """m = M 2^(e - 31) with M in [2^30, 2^31); a mantissa that rounds up to 2^31 carries into the exponent."""
  assert [tuple(map(int, quantize_multiplier(m))) for m in (0.5, 0.75, 1.0, 0.0, 2.0 ** -40)] == [
      (2 ** 30, 0), (3 * 2 ** 29, 0), (2 ** 30, 1), (0, 0), (0, 0)]
  assert tuple(map(int, quantize_multiplier(1 - 2.0 ** -33))) == (2 ** 30, 1)
  rng = np.random.default_rng(0)
  m = np.exp(rng.uniform(-12, 0, 1000))
  q, e = quantize_multiplier(m)
  assert np.all((q >= 2 ** 30) & (q < 2 ** 31))
  np.testing.assert_allclose(q * 2.0 ** (e - 31), m, rtol=2.0 ** -31)


def test_multiply_by_quantized_multiplier_rounds_like_tflite():
  """x m rounded to the nearest integer, away from ties; the two forms of TFLite break ties differently."""
  rng = np.random.default_rng(1)
  x = rng.integers(-2 ** 20, 2 ** 20, 20000)
  m = np.exp(rng.uniform(-10, 0, 20000))
  exact = x * m
  want = np.sign(exact) * np.floor(np.abs(exact) + 0.5)
  # the high multiply first rounds to a multiple of 2^e (e <= 0 here) of the result, so the two-rounding form can
  # land on a tie from up to 2^(e - 1) away and then round it away from zero; the single rounding cannot
  e = quantize_multiplier(m)[1]
  for single, margin in ((False, 2.0 ** (e - 1) + 1e-3), (True, 1e-3)):
    far = np.abs(exact - np.floor(exact) - 0.5) > margin
    got = mbqm(x, m, single)
    np.testing.assert_array_equal(got[far], want[far])
    assert np.abs(got - want).max() <= 1
    if not single:
      assert np.any(got != want)  # near ties: TFLite's answer is not the exact rounding
  # exact ties: the rounding divide goes away from zero, the single rounding up; 0.5 alone is the high multiply,
  # which rounds ties up
  assert mbqm([6, -6, 10, -10], 0.25).tolist() == [2, -2, 3, -3]
  assert mbqm([6, -6, 10, -10], 0.25, True).tolist() == [2, -1, 3, -2]
  assert mbqm([3, -3], 0.5).tolist() == [2, -1]
  # where the two forms differ: 21859 * 0.0016240316 = 35.49970; the high multiply rounds 18175.85 up to 18176 =
  # 35.5 * 2^9, which the shift then rounds away from zero (an accumulator of a LeNet FULLY_CONNECTED layer)
  assert int(mbqm(21859, 0.0016240316135624616)) == 36
  assert int(mbqm(21859, 0.0016240316135624616, True)) == 35


def test_divide_round_half_away():
  """AVERAGE_POOL_2D's division of a window sum by its size: the nearest integer, exact ties away from zero."""
  from fractions import Fraction
  total, n = np.meshgrid(np.arange(-60, 61), np.arange(1, 10))
  got = np.asarray(divide_round_half_away(total, n))
  want = [[int(np.sign(t)) * int(abs(Fraction(int(t), int(k))) + Fraction(1, 2)) for t, k in zip(ts, ks)]
          for ts, ks in zip(total, n)]
  np.testing.assert_array_equal(got, want)
  assert got[1, np.flatnonzero(total[1] == 3)[0]] == 2 and got[1, np.flatnonzero(total[1] == -3)[0]] == -2  # +-1.5


def reference_interpreter(blob):
  from ai_edge_litert.interpreter import Interpreter, OpResolverType
  it = Interpreter(model_content=blob, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                   experimental_preserve_all_tensors=True)
  it.allocate_tensors()
  return it


def assert_bit_exact(blob, codes, output=None):
  """IntegerModel's codes of every tensor equal the reference interpreter's, image by image (up to ``output``)."""
  ours = IntegerModel(blob, output=output).raw(codes, keep=True)
  it = reference_interpreter(blob)
  inp = it.get_input_details()[0]["index"]
  computed = [i for i in ours if i != inp]
  for n, x in enumerate(codes):
    it.set_tensor(inp, x[None])
    it.invoke()
    for i in computed:
      want = it.get_tensor(i)
      got = ours[i][n].reshape(want.shape[1:])
      if not np.array_equal(got, want[0]):
        d = np.abs(got.astype(np.int64) - want[0])
        raise AssertionError(f"image {n}, tensor {i} ({it.get_tensor_details()[i]['name']}): {np.mean(d > 0):.2%} "
                             f"of codes differ, by up to {d.max()}")
  return ours


def assert_equal_to_xnnpack(blob, codes, output=None):
  """IntegerModel(kernels='xnnpack') outputs equal the default interpreter's (XNNPACK delegate), image by image;
  ``output``: an inner tensor instead (the interpreter runs the model cut after it)."""
  lite = E.TFLiteModel(blob, output=output)
  want = np.concatenate([lite.raw(x[None]) for x in codes])
  got = IntegerModel(blob, kernels="xnnpack", output=output).raw(codes)
  d = np.abs(got.astype(np.int64) - want.reshape(got.shape))
  assert d.max() == 0, f"{output}: {np.mean(d > 0):.2%} of output codes differ, by up to {d.max()}"


def quantized(model, params, calib):
  stats = fatq.calibrate(model, params, [calib])
  return {"params": params, "quant_stats": stats, "quant": fatq.init_thresholds(model, params, stats, calib[:1])}


@pytest.mark.parametrize("config", [PER_CHANNEL, W4A4_TENSOR], ids=["W8A8-channel", "W4A4-tensor"])
def test_lenet_bit_exact_with_reference_kernels(mnist, lenet_params, config):
  """LeNet-5 on 100 real MNIST test images: CONV_2D, MAX_POOL_2D, RESHAPE, FULLY_CONNECTED (per-tensor row) and the
  4-bit rows' MINIMUM / MAXIMUM: every tensor equal to TFLite's reference kernels, codes and logits; the outputs
  equal to the default (XNNPACK) kernels' with ``kernels='xnnpack'``."""
  xtr, _, xte, _ = mnist
  model = LeNet5(quant=config)
  variables = quantized(model, lenet_params, xtr[:200])
  blob = E.Exported(model, variables, xte[:1]).convert()
  im = IntegerModel(blob)
  ops = {o.name for o in im.ops}
  assert ("FULLY_CONNECTED" in ops and "MINIMUM" in ops) if config is W4A4_TENSOR else "CONV_2D" in ops
  assert_bit_exact(blob, im.quantize_input(xte[:100]))
  assert_equal_to_xnnpack(blob, im.quantize_input(xte[:100]))
  # float in, float out: the same logits as the interpreter's, in batches (the last one padded)
  lite = E.TFLiteModel(blob, kernels="reference")
  np.testing.assert_array_equal(IntegerModel(blob, batch_size=64)(xte[:100]), lite(xte[:100]))


def test_mobilenet_v2_bit_exact_with_reference_kernels():
  """The tiny MobileNet v2 (DEPTHWISE_CONV_2D, residual ADD, AVERAGE_POOL_2D) on real ImageNet images at 32 px."""
  from fatq.data import imagenet
  from fatq.models import mobilenet_v2
  images = imagenet.val_set("fat", 32, 0, limit=24).images
  float_model = mobilenet_v2.tiny()
  params = float_model.init(jax.random.key(0), images[:1])["params"]
  model = mobilenet_v2.tiny(quant=PER_CHANNEL)
  variables = quantized(model, params, images)
  blob = E.Exported(model, variables, images[:1]).convert()
  im = IntegerModel(blob)
  assert {"DEPTHWISE_CONV_2D", "ADD", "AVERAGE_POOL_2D"} <= {o.name for o in im.ops}
  assert_bit_exact(blob, im.quantize_input(images))
  assert_equal_to_xnnpack(blob, im.quantize_input(images))
  for add in (o for o in im.ops if o.name == "ADD"):  # XNNPACK's own ADD, before later layers can hide a flip
    assert_equal_to_xnnpack(blob, im.quantize_input(images), output=add.outputs[0])
  with pytest.raises(ValueError, match="output='nothing': no such tensor"):
    E.TFLiteModel(blob, output="nothing")


def test_google_ptq_int8_mobilenet_v2_end_to_end():
  """A file fatq did not write: Google's int8 post-training-quantized MobileNet v2 (TF2 converter; a MEAN with a scale
  of its own as the global pool; SOFTMAX and uint8 QUANTIZE at the end), on 8 real ImageNet images: every tensor equal
  to the reference kernels', the MEAN's output, the logits and the probabilities equal to the default kernels'."""
  from fatq.data import imagenet
  from fatq.data.paths import data_root
  blob = (data_root() / "models" / "mobilenet_v2_1.0_224_ptq_int8.tflite").read_bytes()
  logits = "MobileNetV2/top/SpatialSqueeze/Reshape;StatefulPartitionedCall/MobileNetV2/top/SpatialSqueeze/Reshape"
  im = IntegerModel(blob)
  mean = next(o for o in im.ops if o.name == "MEAN")
  assert [o.name for o in im.ops[-2:]] == ["SOFTMAX", "QUANTIZE"]  # int8 probabilities, then uint8 ones
  codes = im.quantize_input(imagenet.val_set("fat", 224, 1, limit=8).images)
  ours = assert_bit_exact(blob, codes)
  assert len(np.unique(ours[mean.outputs[0]])) > 50  # a real spread of pooled codes, not a saturated tensor
  probs = ours[im.output]  # uint8 codes of 1/256
  assert probs.max(axis=-1).min() > 20 and np.all(np.sum(probs > 0, axis=-1) >= 2)  # a real spread
  assert_equal_to_xnnpack(blob, codes, output=mean.outputs[0])
  assert_equal_to_xnnpack(blob, codes, output=logits)
  assert_equal_to_xnnpack(blob, codes)


def softmax_model(spread: float, beta: float = 1.0, uint8: bool = False, classes: int = 1001,
                  input_scale: float | None = None) -> bytes:
  """A .tflite model of one int8 SOFTMAX (TF converter, logits of standard deviation ``spread`` for calibration),
  edited to another ``beta``, to uint8 tensors (zero points + 128), which the converter no longer writes, or to
  another ``input_scale``."""
  import flatbuffers
  import tensorflow as tf
  from ai_edge_litert import schema_py_generated as schema
  module = tf.Module()
  module.f = tf.function(tf.nn.softmax, input_signature=[tf.TensorSpec([1, classes], tf.float32)])
  conv = tf.lite.TFLiteConverter.from_concrete_functions([module.f.get_concrete_function()], module)
  conv.optimizations = [tf.lite.Optimize.DEFAULT]
  conv.representative_dataset = lambda: ([np.random.default_rng(i).normal(scale=spread, size=(1, classes))
                                          .astype(np.float32)] for i in range(8))
  conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  conv.inference_input_type = conv.inference_output_type = tf.int8
  m = schema.ModelT.InitFromPackedBuf(conv.convert(), 0)
  g = m.subgraphs[0]
  assert [m.operatorCodes[o.opcodeIndex].builtinCode for o in g.operators] == [schema.BuiltinOperator.SOFTMAX]
  g.operators[0].builtinOptions.beta = beta
  if input_scale is not None:
    g.tensors[g.inputs[0]].quantization.scale = np.asarray([input_scale], np.float32)
  for t in g.tensors if uint8 else []:
    t.type = schema.TensorType.UINT8
    t.quantization.zeroPoint = np.asarray(t.quantization.zeroPoint) + 128
  builder = flatbuffers.Builder(1024)
  builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
  return bytes(builder.Output())


@pytest.mark.parametrize("spread,beta,uint8", [(1.0, 1.0, False), (20.0, 1.0, False), (4.0, 0.3, False),
                                               (4.0, 2.5, True)])
def test_softmax_bit_exact(spread, beta, uint8):
  """SOFTMAX alone, on random logits codes from flat to peaked: equal to the reference kernel (gemmlowp fixed-point
  exp and reciprocal) and to the interpreter's default (a float32 exp table; XNNPACK does not take it), code for
  code. The reference kernel aborts where the exps sum to 512 or more (a shift over 31 bits), so its rows are those
  that sum to less."""
  blob = softmax_model(spread, beta, uint8)
  im = IntegerModel(blob)
  t = im.tensors[im.input]
  rng = np.random.default_rng(0)
  codes = np.concatenate([rng.integers(-128, 128, (40, 1001)),
                          np.round(rng.normal(-20, 15, (40, 1001))),
                          np.round(rng.normal(-60, 8, (40, 1001))) + 120 * (rng.random((40, 1001)) < 0.003)])
  codes = (np.clip(codes, -128, 127) + (128 if uint8 else 0)).astype(im.input_dtype)
  exps = np.exp(np.float64(t.scale[0]) * beta * (codes - codes.max(axis=1, keepdims=True).astype(np.float64)))
  summable = exps.sum(axis=1) < 500
  assert summable.sum() >= 80
  ours = assert_bit_exact(blob, codes[summable])[im.output]
  assert np.sum(ours > np.iinfo(im.output_dtype).min) > 1000  # probabilities of many sizes, not all zero
  assert_equal_to_xnnpack(blob, codes)


def test_softmax_exp_table_from_the_c_library():
  """The default kernel reads exp from a table of the C library's ``expf``, whose last bit is not always the correctly
  rounded one: at input scale 0.10728192 it differs at entry 7, ``exp(-7 s)``, and in this row (found by a search)
  the second probability sits so near a tie that the entry decides its code. Equal to the interpreter's; one code
  lower with the correctly rounded exp."""
  from fatq import integer
  scale = 0.10728192329406738
  blob = softmax_model(4.0, input_scale=scale)
  row = np.array([[127, 120, 123, 123, 73, 40, 6, -18, -54, -90, -113, -125] + [-128] * 989], np.int8)
  want = E.TFLiteModel(blob).raw(row)
  np.testing.assert_array_equal(IntegerModel(blob, kernels="xnnpack").raw(row), want)
  entry = np.float32(-np.float32(scale)) * np.float32(7)
  if integer._expf(entry) == np.float32(np.exp(np.float64(entry))):
    pytest.skip("this C library's expf is correctly rounded at the entry that the row tests")
  with mock.patch.object(integer, "_c_expf", lambda: None):  # the correctly rounded exp
    assert IntegerModel(blob, kernels="xnnpack").raw(row)[0, 1] == want[0, 1] - 1


def test_softmax_fixed_point_exp_and_reciprocal():
  """The reference SOFTMAX's gemmlowp functions, against float64: exp of Q5.26 values in [-32, 0] as Q0.31 within
  2.5e-7 (a Taylor polynomial and a barrel of exp(-2^k) factors), 1 / (1 + x) for x in [0, 1) within 3e-9 (three
  Newton-Raphson steps; two would be 1e-5 off)."""
  from fatq.integer import _exp_on_negative_values, _one_over_one_plus_x
  with jax.enable_x64(True):
    a = np.concatenate([np.arange(-2 ** 31, 1, 2 ** 31 // 100003), np.arange(-5000, 1)]).astype(np.int64)
    got = np.asarray(_exp_on_negative_values(a)) / 2.0 ** 31
    assert np.abs(got - np.exp(a / 2.0 ** 26)).max() <= 2.5e-7
    x = np.arange(0, 2 ** 31, 2 ** 31 // 100003, dtype=np.int64)
    got = np.asarray(_one_over_one_plus_x(x)) / 2.0 ** 31
    assert np.abs(got - 1 / (1 + x / 2.0 ** 31)).max() <= 3e-9


@pytest.mark.parametrize("uint8", [False, True], ids=["int8", "uint8"])
def test_softmax_rounds_ties_up(uint8):
  """512 equal logits: each probability is 1/512, half a code of 1/256. The default kernel rounds it up to 1 code
  (int8: std::round, ties away from zero; uint8: + 0.5, truncated), not to the even 0."""
  blob = softmax_model(4.0, uint8=uint8, classes=512)
  im = IntegerModel(blob, kernels="xnnpack")
  codes = np.full((2, 512), 7 + (128 if uint8 else 0), im.input_dtype)
  lowest = np.iinfo(im.output_dtype).min
  np.testing.assert_array_equal(E.TFLiteModel(blob).raw(codes[:1]), lowest + 1)
  np.testing.assert_array_equal(im.raw(codes), lowest + 1)


def test_refuses_a_mean_over_channels():
  """MEAN is computed over the spatial axes of NHWC tensors only; any other is refused with its axes."""
  import tensorflow as tf
  module = tf.Module()
  module.f = tf.function(lambda x: tf.reduce_mean(x, axis=3, keepdims=True),
                         input_signature=[tf.TensorSpec([1, 4, 4, 3], tf.float32)])
  conv = tf.lite.TFLiteConverter.from_concrete_functions([module.f.get_concrete_function()], module)
  conv.optimizations = [tf.lite.Optimize.DEFAULT]
  conv.representative_dataset = lambda: ([np.random.default_rng(i).normal(size=(1, 4, 4, 3)).astype(np.float32)]
                                         for i in range(8))
  conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  conv.inference_input_type = conv.inference_output_type = tf.int8
  with pytest.raises(UnsupportedOpError, match=r"MEAN .* over axes \[3\] of a 4-D tensor: IntegerModel computes the "
                                               r"spatial mean of NHWC tensors \(axes 1 and 2\) only"):
    IntegerModel(conv.convert())


def test_refuses_a_model_of_two_inputs_or_outputs_by_name():
  import tensorflow as tf
  spec = tf.TensorSpec([1, 4, 4, 3], tf.float32)
  for fn, signature, message in ((lambda x, y: x + y, [spec, spec], "the model has 2 inputs; IntegerModel evaluates "
                                  "models with one"),
                                 (lambda x: (2 * x, -x), [spec], "the model has 2 outputs; name the one to evaluate")):
    module = tf.Module()
    module.f = tf.function(fn, input_signature=signature)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([module.f.get_concrete_function()], module)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda n=len(signature): (
        [np.random.default_rng(i).normal(size=(1, 4, 4, 3)).astype(np.float32) for _ in range(n)] for i in range(8))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    with pytest.raises(UnsupportedOpError, match=message):  # was "too many values to unpack"
      IntegerModel(conv.convert())


def test_refuses_what_it_cannot_compute(mnist, lenet_params, tmp_path):
  xte = mnist[2]
  float_blob = E.convert_float(E.float_function(LeNet5(), lenet_params, xte[:1]))
  with pytest.raises(UnsupportedOpError, match="not a full-integer model"):
    IntegerModel(float_blob)
  bad = tmp_path / "model.tflite"
  bad.write_bytes(b"not a flatbuffer at all")
  with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
    IntegerModel(bad)
  model = LeNet5(quant=PER_CHANNEL)
  im = IntegerModel(E.Exported(model, quantized(model, lenet_params, mnist[0][:100]), xte[:1]).convert())
  with pytest.raises(ValueError, match=r"the model takes \(batch,\) \+ \(28, 28, 1\)"):
    im.raw(np.zeros((2, 32, 32, 1), np.int8))
  with pytest.raises(ValueError, match="output='logits': no such tensor"):
    IntegerModel(float_blob, output="logits")


def assert_integer_arithmetic_equals_interpreter(model, variables, images, eval_model=None):
  """The fake-quant model itself, evaluated in integer arithmetic (``fatq.layers.integer_arithmetic``) with the
  export's grids, gives the default interpreter's logits exactly, with every layer in integer arithmetic. Returns the
  evaluated model and variables."""
  model, variables, _ = E.tie_pool(model, variables, images[:1], log=lambda *_: None)
  ex = E.Exported(model, variables, images[:1])
  blob = ex.convert()
  variables = ex.snap_biases(variables)
  float_layers = []
  em = (eval_model or model).clone(quant=model.quant, **({"quantize_pool": model.quantize_pool}
                                                         if hasattr(model, "quantize_pool") else {}))
  got = E.predict(em, variables, images, arithmetic="integer", float_layers=float_layers, grids=ex.grids())
  assert float_layers == []
  want = E.TFLiteModel(blob)(images)
  d = np.abs(got - want) / IntegerModel(blob).output_step
  assert d.max() == 0, f"logits differ on {np.mean(np.any(d > 0, axis=1)):.1%} of images, by up to {d.max():.0f} steps"
  return em, variables


@pytest.mark.parametrize("config", [PER_CHANNEL, W4A4_TENSOR], ids=["W8A8-channel", "W4A4-tensor"])
def test_lenet_integer_arithmetic_equals_interpreter(mnist, lenet_params, config):
  xtr, _, xte, _ = mnist
  model = LeNet5(quant=config)
  assert_integer_arithmetic_equals_interpreter(model, quantized(model, lenet_params, xtr[:200]), xte[:500])


def test_mobilenet_v2_integer_arithmetic_equals_interpreter():
  """Depthwise and 1x1 convolutions in both forms ('lax' exported, 'fast' evaluated), residual adds, the pool."""
  from fatq.data import imagenet
  from fatq.models import mobilenet_v2
  images = imagenet.val_set("fat", 32, 0, limit=24).images
  params = mobilenet_v2.tiny().init(jax.random.key(0), images[:1])["params"]
  model = mobilenet_v2.tiny(quant=PER_CHANNEL)
  em, variables = assert_integer_arithmetic_equals_interpreter(model, quantized(model, params, images), images,
                                                               eval_model=mobilenet_v2.tiny(impl="fast"))
  # without the export's grids the residual adds (whose fixed-point multipliers need them) stay float, and are named
  # (while tracing: no need to compile)
  with integer_arithmetic() as layers:
    jax.eval_shape(lambda v, x: em.apply(v, x), variables, images[:1])
  assert layers.float == ["block2/add", "block4/add"]


def test_integer_arithmetic_lists_layers_it_cannot_compute(mnist, lenet_params):
  """A layer whose input is not on a quantizer's grid (here: no input quantizer) stays in float arithmetic, and is
  named; outside the context nothing changes."""
  xtr, _, xte, _ = mnist
  config = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(8, per_channel=True), fatq.QuantSpec.fat(8, symmetric=False),
                                    extra=[fatq.QuantRule("input", None)])
  model = LeNet5(quant=config)
  variables = quantized(model, lenet_params, xtr[:200])
  float_layers = []
  got = E.predict(model, variables, xte[:50], arithmetic="integer", float_layers=float_layers)
  assert float_layers == ["conv1"]
  assert np.mean(got.argmax(1) == E.predict(model, variables, xte[:50]).argmax(1)) >= 0.98
  with pytest.raises(ValueError, match="arithmetic must be 'float' or 'integer'"):
    E.predict(model, variables, xte[:2], arithmetic="int8")


def test_integer_conv_subtracts_the_weight_zero_point():
  """A uint8 CONV_2D with a non-zero weight zero point (the legacy scheme): the accumulator is
  sum (x - z_x)(w - z_w) + bias, as TFLite's reference kernel computes it."""
  from fatq import integer

  rng = np.random.default_rng(0)
  w = rng.integers(0, 256, (3, 1, 1, 2)).astype(np.uint8)  # OHWI
  x = rng.integers(0, 256, (1, 4, 4, 2)).astype(np.int64)
  T = integer._Tensor
  tensors = {0: T("x", (1, 4, 4, 2), np.uint8, np.float32([0.02]), np.int64([100]), 0),
             1: T("w", w.shape, np.uint8, np.float32([0.01]), np.int64([131]), 0, w),
             2: T("y", (1, 4, 4, 3), np.uint8, np.float32([0.05]), np.int64([7]), 0)}
  op = integer._Op("CONV_2D", [0, 1, -1], [2], dict(strideH=1, strideW=1, padding=1, dilationHFactor=1,
                                                     dilationWFactor=1, fusedActivationFunction=0))
  with jax.enable_x64(True):
    got = np.asarray(integer._conv(jnp.asarray(x), tensors, op, depthwise=False))
  acc = np.einsum("nhwi,oi->nhwo", x - 100, w[:, 0, 0, :].astype(np.int64) - 131)
  want = np.clip(np.floor(acc * 0.02 * 0.01 / 0.05 + 0.5) + 7, 0, 255)  # no exact ties here
  np.testing.assert_array_equal(got, want)
