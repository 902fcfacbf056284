"""Checkpoint loaders against the original frameworks (Keras, the TFLite interpreter) on real files and images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fatq import models
from fatq.data import data_root, imagenet
from fatq.models import loaders, mnasnet, mobilenet_v1
from fatq.models.loaders import CheckpointError

MODELS = data_root() / "models"
TFJS = MODELS / "mobilenet_v1_0.75_224_keras_tfjs"
V1_TFLITE = MODELS / "mobilenet_v1_0.25_224_float.tflite"
V2_INT8 = MODELS / "mobilenet_v2_1.0_224_ptq_int8.tflite"
V2_UINT8 = MODELS / "mobilenet_v2_1.0_224_qat_uint8.tflite"


def _val(n, offset):
  return imagenet.val_set("fat", 224, offset, limit=n)


def _interp(path):
  from ai_edge_litert.interpreter import Interpreter
  it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
  it.allocate_tensors()
  return it


def _batched(fn, x, bs=16):
  return np.concatenate([np.asarray(fn(x[i:i + bs])) for i in range(0, len(x), bs)])


# ---------------------------------------------------------------------------------------------------------------------
# Keras weights.


def test_tfjs_mobilenet_v1_matches_keras():
  import tensorflow as tf

  model, params, report = models.load(dict(name="mobilenet_v1", width=0.75, num_classes=1000, checkpoint=str(TFJS),
                                           checkpoint_format="tfjs"))
  assert report.folded_batch_norms == 27 and report.eps == 1e-3 and report.num_tensors == 56
  keras = tf.keras.applications.MobileNet(alpha=0.75, weights=None, classifier_activation=None)
  raw, _ = loaders.read_tfjs(TFJS)
  for layer in keras.layers:
    if layer.weights:
      names = [w.path.split("/")[-1] if hasattr(w, "path") else w.name.split("/")[-1].split(":")[0]
               for w in layer.weights]
      layer.set_weights([raw[layer.name][n if n in raw[layer.name] else "depthwise_kernel"] for n in names])
  x = _val(8, 0).images
  want = keras.predict(x, verbose=0)
  got = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x))(x))
  assert np.max(np.abs(got - want)) <= 1e-4
  assert np.mean(got.argmax(-1) == want.argmax(-1)) == 1.0


def _random_keras_v1(tf, classes=10):
  keras = tf.keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=classes,
                                          classifier_activation=None)
  rng = np.random.default_rng(0)
  for layer in keras.layers:
    if isinstance(layer, tf.keras.layers.BatchNormalization):
      c = layer.weights[0].shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                         rng.uniform(0.5, 1.5, c)])
  return keras


def test_keras_h5_round_trip(tmp_path):
  import tensorflow as tf

  keras = _random_keras_v1(tf)
  path = tmp_path / "mobilenet.h5"
  keras.save(path)
  model = mobilenet_v1.MobileNetV1(0.25, 10, keras_padding=True)
  params, report = loaders.load_checkpoint(model, path, image_size=32)
  assert report.format == "keras_h5" and report.folded_batch_norms == 27
  x = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  got = np.asarray(model.apply({"params": params}, x))
  assert np.max(np.abs(got - keras.predict(x, verbose=0))) <= 1e-4
  # A Keras 3 .weights.h5 has no layer names: a clear error, not a wrong model.
  keras.save_weights(tmp_path / "m.weights.h5")
  with pytest.raises(CheckpointError, match="weights.h5"):
    loaders.load_checkpoint(model, tmp_path / "m.weights.h5", image_size=32)


def test_mobilenet_v1_pads_as_its_checkpoint_at_odd_sizes(tmp_path):
  # Keras 2.1 (the tfjs checkpoint) pads stride-2 convolutions SAME, Keras 2.2+ by (0, 1) + VALID: the same at even
  # sizes, not at odd ones. The model takes the padding of the checkpoint's stored topology, compared here with the
  # file's own Keras 2.1 network rebuilt in tf.keras (SAME everywhere) at 35 px (the tfjs default was Keras 2.2's)
  import tensorflow as tf

  size, raw, L = 35, loaders.read_tfjs(TFJS)[0], tf.keras.layers
  inp = tf.keras.Input((size, size, 3))

  def layer(x, lay, weights, bn=None):
    y = lay(x)
    lay.set_weights(weights)
    if bn is None:
      return y
    norm = L.BatchNormalization(epsilon=1e-3)
    y = norm(y)
    norm.set_weights([raw[bn][k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
    return L.ReLU(6.0)(y)

  x = layer(inp, L.Conv2D(24, 3, 2, padding="same", use_bias=False), [raw["conv1"]["kernel"]], "conv1_bn")
  for i, (filters, stride) in enumerate(mobilenet_v1.BLOCKS, 1):
    x = layer(x, L.DepthwiseConv2D(3, stride, padding="same", use_bias=False),
              [raw[f"conv_dw_{i}"]["depthwise_kernel"]], f"conv_dw_{i}_bn")
    x = layer(x, L.Conv2D(int(filters * 0.75), 1, use_bias=False), [raw[f"conv_pw_{i}"]["kernel"]], f"conv_pw_{i}_bn")
  x = L.GlobalAveragePooling2D()(x)
  keras21 = tf.keras.Model(inp, layer(x, L.Dense(1000), [raw["conv_preds"]["kernel"][0, 0], raw["conv_preds"]["bias"]]))
  images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  want = keras21.predict(images, verbose=0)
  for fmt in ("tfjs", ""):  # as named, and guessed from the path
    model, params, _ = models.load(dict(name="mobilenet_v1", width=0.75, num_classes=1000, checkpoint=str(TFJS),
                                        checkpoint_format=fmt, image_size=size))
    assert not model.keras_padding
    np.testing.assert_allclose(model.apply({"params": params}, images), want, atol=1e-4, rtol=0)
  assert np.max(np.abs(model.clone(keras_padding=True).apply({"params": params}, images) - want)) > 0.1

  # a Keras 2.2+ model saved whole stores its ZeroPadding2D layers; a weights-only file stores no topology
  keras = _random_keras_v1(tf)
  keras.save(tmp_path / "m.h5")
  import h5py
  import shutil
  shutil.copy(tmp_path / "m.h5", tmp_path / "w.h5")
  with h5py.File(tmp_path / "w.h5", "r+") as f:
    del f.attrs["model_config"]
  assert loaders.stored_keras_padding(tmp_path / "m.h5", "keras_h5") is True
  assert loaders.stored_keras_padding(tmp_path / "w.h5", "keras_h5") is None
  assert loaders.stored_keras_padding(TFJS, "tfjs") is False
  cfg = dict(name="mobilenet_v1", width=0.25, num_classes=10, checkpoint_format="")
  assert models.build(dict(cfg, checkpoint=str(tmp_path / "m.h5"))).keras_padding
  assert not models.build(dict(cfg, checkpoint=str(tmp_path / "m.h5"), keras_padding=False)).keras_padding
  assert not models.build(dict(cfg, checkpoint=str(V1_TFLITE))).keras_padding


# ---------------------------------------------------------------------------------------------------------------------
# Errors.


def test_bad_checkpoints(tmp_path):
  raw, eps = loaders.read_tfjs(TFJS)
  m = mobilenet_v1.MobileNetV1(0.75, 1000, keras_padding=True)
  missing = {k: v for k, v in raw.items() if k != "conv_pw_5"}
  with pytest.raises(CheckpointError, match=r"conv_pw_5.*block5/pointwise/kernel.*\(1, 1, 192, 192\)"):
    loaders.load_keras_weights(m, missing, eps, "x", "tfjs")
  extra = dict(raw, conv_pw_14={"kernel": np.zeros((1, 1, 768, 768))})
  with pytest.raises(CheckpointError, match="conv_pw_14"):
    loaders.load_keras_weights(m, extra, eps, "x", "tfjs")
  bad = dict(raw, conv_dw_3={"depthwise_kernel": np.zeros((5, 5, 96, 1))})
  with pytest.raises(CheckpointError, match=r"conv_dw_3/depthwise_kernel.*\(5, 5, 1, 96\).*block3/depthwise.*"
                                            r"\(3, 3, 1, 96\)"):
    loaders.load_keras_weights(m, bad, eps, "x", "tfjs")
  with pytest.raises(CheckpointError, match=r"conv_preds.*\(768, 1001\).*1000 classes.*1001"):
    loaders.load_checkpoint(mobilenet_v1.MobileNetV1(0.75, 1001, keras_padding=True), TFJS)
  with pytest.raises(CheckpointError, match=r"conv1/kernel.*\(3, 3, 3, 16\).*width multiplier ~0\.75"):
    loaders.load_checkpoint(mobilenet_v1.MobileNetV1(0.5, 1000), TFJS)
  with pytest.raises(CheckpointError, match=r"width multiplier ~0\.25"):
    loaders.load_checkpoint(mobilenet_v1.MobileNetV1(0.5, 1001), V1_TFLITE)
  with pytest.raises(CheckpointError, match=r"conv1/kernel.*file has 28 convolution/dense operators and the model 53 "
                                            r".*another architecture"):
    loaders.load_checkpoint(mnasnet.MnasNet(1.0, 1001), V1_TFLITE)
  # another architecture whose first layers fit is named as such, not as a width (the hint said "~2" here)
  with pytest.raises(CheckpointError, match=r"block1/expand.*layers before it matched.*another architecture"):
    loaders.load_checkpoint(mnasnet.MnasNet(1.0, 1001), V2_INT8)
  # a Keras 3 .keras file is a zip archive, not HDF5
  import zipfile
  with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:
    z.writestr("config.json", "{}")
  with pytest.raises(CheckpointError, match=r"'\.keras' archive.*model\.save\('model\.h5'\)"):
    loaders.load_checkpoint(m, tmp_path / "m.keras")
  # a tfjs weight of a dtype the reader does not know (was a bare KeyError)
  import json
  import shutil

  shutil.copytree(TFJS, tmp_path / "tfjs")
  manifest = json.loads((tmp_path / "tfjs" / "model.json").read_text())
  manifest["weightsManifest"][0]["weights"][0]["dtype"] = "float16"
  (tmp_path / "tfjs" / "model.json").write_text(json.dumps(manifest))
  with pytest.raises(CheckpointError, match="dtype 'float16'"):
    loaders.load_checkpoint(m, tmp_path / "tfjs")
  junk = tmp_path / "junk.tflite"
  junk.write_bytes(b"not a model at all" * 10)
  with pytest.raises(CheckpointError, match="not a TFLite flatbuffer"):
    loaders.load_checkpoint(m, junk)
  (tmp_path / "junk.h5").write_text("hello")
  with pytest.raises(CheckpointError, match="not an HDF5"):
    loaders.load_checkpoint(m, tmp_path / "junk.h5")
  # a config's format is its default file's: a user's .h5 given to a tfjs config says which setting to change
  with pytest.raises(CheckpointError, match=r"junk.h5 is named like a 'keras_h5' checkpoint, not 'tfjs'.*"
                                            r"--config.model.checkpoint_format=keras_h5"):
    loaders.load_checkpoint(m, tmp_path / "junk.h5", "tfjs")
  (tmp_path / "model.json").write_text("{}")
  with pytest.raises(CheckpointError, match="model.json"):
    loaders.load_checkpoint(m, tmp_path / "model.json")
  with pytest.raises(FileNotFoundError):
    loaders.load_checkpoint(m, tmp_path / "nothing.tflite")


# ---------------------------------------------------------------------------------------------------------------------
# TFLite.


def test_float_tflite_mobilenet_v1_matches_interpreter():
  model, params, report = models.load(dict(name="mobilenet_v1", width=0.25, num_classes=1001,
                                           checkpoint=str(V1_TFLITE)))
  assert report.num_tensors == 56 and report.dequantized == 0
  x = _val(8, 1).images
  it = _interp(V1_TFLITE)
  g = loaders.TFLiteGraph(V1_TFLITE)
  logits_t = g.conv_ops()[-1]["outputs"][0]
  probs, logits = [], []
  for img in x:
    it.set_tensor(it.get_input_details()[0]["index"], img[None])
    it.invoke()
    probs.append(it.get_tensor(it.get_output_details()[0]["index"])[0])
    logits.append(it.get_tensor(logits_t).reshape(-1))
  got = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x))(x))
  assert np.max(np.abs(got - np.stack(logits))) <= 1e-4
  assert np.max(np.abs(np.asarray(jax.nn.softmax(got)) - np.stack(probs))) <= 1e-4


def _keras_mnasnet(tf, model, params, size):
  """The same MnasNet in Keras (folded BN: conv + bias), weights from the Flax params."""
  L = tf.keras.layers
  inp = tf.keras.Input((size, size, 3))

  def conv(x, p, k, s, act, depthwise=False):
    kern = np.asarray(p["kernel"])
    if depthwise:
      lay = L.DepthwiseConv2D(k, s, padding="same", activation=act)
      y = lay(x)
      lay.set_weights([kern.transpose(0, 1, 3, 2), np.asarray(p["bias"])])
    else:
      lay = L.Conv2D(kern.shape[-1], k, s, padding="same", activation=act)
      y = lay(x)
      lay.set_weights([kern, np.asarray(p["bias"])])
    return y

  x = conv(inp, params["conv1"], 3, 2, "relu")
  i = 0
  for repeats, k, s, e, out, skip in model.blocks:
    for r in range(repeats):
      p, stride, y = params[f"block{i}"], (s if r == 0 else 1), x
      if e != 1:
        y = conv(y, p["expand"], 1, 1, "relu")
      y = conv(y, p["depthwise"], k, stride, "relu", depthwise=True)
      y = conv(y, p["project"], 1, 1, None)
      x = L.Add()([x, y]) if skip and stride == 1 and x.shape[-1] == y.shape[-1] else y
      i += 1
  x = conv(x, params["head"], 1, 1, "relu")
  x = L.GlobalAveragePooling2D()(x)
  dense = L.Dense(params["logits"]["kernel"].shape[-1])
  out = dense(x)
  dense.set_weights([np.asarray(params["logits"]["kernel"]), np.asarray(params["logits"]["bias"])])
  return tf.keras.Model(inp, out)


def test_mnasnet_tflite_round_trip(tmp_path):
  import tensorflow as tf

  size = 64
  model = mnasnet.tiny()
  x = np.random.default_rng(0).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
  params = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(1), a.shape), params)
  keras = _keras_mnasnet(tf, model, params, size)
  path = tmp_path / "mnasnet_tiny.tflite"
  path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras).convert())
  loaded, report = loaders.load_checkpoint(mnasnet.tiny(), path, image_size=size)
  assert report.num_tensors == 2 * len(loaders.ordered_layers(model, size))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  it = _interp(path)
  want = []
  for img in x:
    it.set_tensor(it.get_input_details()[0]["index"], img[None])
    it.invoke()
    want.append(it.get_tensor(it.get_output_details()[0]["index"])[0])
  got = np.asarray(model.apply({"params": loaded}, x))
  assert np.max(np.abs(got - np.stack(want))) <= 1e-4
  with pytest.raises(CheckpointError, match="width multiplier"):
    loaders.load_checkpoint(mnasnet.tiny(width=1.0), path, image_size=size)

  # float16 weights: a DEQUANTIZE operator computes each float32 kernel, which the interpreter has not run (the
  # loader read its uninitialised output before: values up to 1e38, NaN logits); they come from the stored constants
  converter = tf.lite.TFLiteConverter.from_keras_model(keras)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.target_spec.supported_types = [tf.float16]
  half = tmp_path / "mnasnet_tiny_fp16.tflite"
  half.write_bytes(converter.convert())
  loaded, _ = loaders.load_checkpoint(mnasnet.tiny(), half, image_size=size)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a).astype(np.float16).astype(np.float32), np.asarray(b))
  # a file with float activations has no ranges for the fake-quant model to reproduce
  with pytest.raises(CheckpointError, match="not an integer-quantized"):
    loaders.tflite_quant_state(mnasnet.tiny(), half, image_size=size)


# ---------------------------------------------------------------------------------------------------------------------
# Quantized MobileNet v2: fake quant with the file's own ranges vs the integer interpreter.


def quantized_check(path, n, float_arithmetic=True):
  """fatq's fake-quant MobileNet v2 with a quantized file's own scales and zero points
  (:func:`loaders.tflite_quant_state`) against the interpreter (its default XNNPACK kernels) at the logits (the file
  is cut before its SOFTMAX): in the file's integer arithmetic (:func:`fatq.layers.integer_arithmetic`) and in the
  float arithmetic of training (``float_arithmetic``). Returns the agreements, the largest logit differences in
  output steps and the top-1s (also of the dequantized float model)."""
  from fatq.export import TFLiteModel
  from fatq.layers import integer_arithmetic

  model, params, report = models.load(dict(name="mobilenet_v2", width=1.0, num_classes=1001, checkpoint=str(path)))
  assert report.dequantized == 106
  state = loaders.tflite_quant_state(model, path, params=params)
  variables = {"params": params, "quant_stats": state.stats}
  val = _val(n, 1)
  x, labels = val.images, val.labels
  lite = TFLiteModel(path, output=loaders.TFLiteGraph(path).conv_ops()[-1]["outputs"][0])
  want, step = lite(x).reshape(len(x), -1), lite.output_step
  with integer_arithmetic(state.grids, state.scheme) as layers:
    integer = _batched(jax.jit(lambda x: state.model.apply(variables, x)), x)
  assert not layers.float and len(layers.integer) >= 63  # 52 convolutions, the logits, 10 adds (and a MEAN)
  r = dict(n=len(x), integer_agreement=float(np.mean(integer.argmax(-1) == want.argmax(-1))),
           integer_max_steps=float(np.max(np.abs(integer - want)) / step),
           interpreter_top1=float(np.mean(want.argmax(-1) == labels)),
           fake_quant_top1=float(np.mean(integer.argmax(-1) == labels)))
  if not float_arithmetic:
    return r
  fq = _batched(jax.jit(lambda x: state.model.apply(variables, x)), x)
  fl = _batched(jax.jit(lambda x: model.apply({"params": params}, x)), x)
  # 8-bit logits tie: a top-1 of the float arithmetic agrees when it is one of the interpreter's tied maxima
  tied = np.isclose(want, want.max(-1, keepdims=True), rtol=0, atol=step / 4)
  return dict(r, float_agreement=float(np.mean(fq.argmax(-1) == want.argmax(-1))),
              float_agreement_tie_aware=float(np.mean(tied[np.arange(len(x)), fq.argmax(-1)])),
              float_max_steps=float(np.max(np.abs(fq - want)) / step),
              fake_quant_float_arithmetic_top1=float(np.mean(fq.argmax(-1) == labels)),
              dequantized_float_top1=float(np.mean(fl.argmax(-1) == labels)))


def test_quantized_mobilenet_v2_fast():
  # 16 images: one batch of _batched, so one compile (24 took twice as long); the uint8 file, the float arithmetic
  # and all 1000 images: the slow test
  r = quantized_check(V2_INT8, 16, float_arithmetic=False)
  print(V2_INT8.name, r)
  # the interpreter's logits exactly (measured on all 1000 images of both files: the slow test)
  assert r["integer_agreement"] == 1.0 and r["integer_max_steps"] < 1e-3, r


@pytest.mark.slow
@pytest.mark.parametrize("path", [V2_INT8, V2_UINT8], ids=["ptq_int8", "qat_uint8"])
def test_quantized_mobilenet_v2_1000(path):
  r = quantized_check(path, 1000)
  print(f"\n{path.name}: {r}")
  assert r["integer_agreement"] == 1.0 and r["integer_max_steps"] < 1e-3, r
  assert r["float_agreement_tie_aware"] >= 0.97, r
