"""Checkpoint loaders: the ONE place that maps each format's tensor names onto fatq's Flax parameter trees.

Formats:

* Keras ``.h5`` as keras.applications writes them (``model.save('x.h5')`` / the downloadable ``*_tf.h5`` weights:
  groups ``[model_weights/]<layer>/<layer>/<weight>[:0]``), MobileNet v1 and v2;
* TensorFlow.js layers format: ``model.json`` (topology + weights manifest) and its binary shards;
* TFLite flatbuffers, read through the TFLite interpreter (``get_tensor_details`` / ``get_tensor``): float models,
  and quantized ones (int8 per-channel, uint8 per-tensor) dequantized with their scales and zero points.

Keras names are mapped by a per-architecture table (:func:`keras_layer_map`); TFLite graphs, whose tensor names
depend on the converter, are mapped structurally: the CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED operators in
execution order onto the model's conv/dense layers in execution order, each checked against the expected shape.
Batch norm is folded at load time with the checkpoint's eps. Every loader returns ``(params, LoadReport)``; a
checkpoint that does not fit raises :class:`CheckpointError` naming the tensor and the expected shape.

:func:`tflite_quant_state` turns a quantized TFLite file's own activation (and weight) ranges into fatq
``quant_stats`` plus the matching fixed :class:`~fatq.config.QuantConfig` (and the module to use them with), so that a fake-quant fatq model reproduces
the integer model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fatq.folding import fold_batch_norm
from fatq.models.common import layers as model_layers

KERAS_BN_EPS = 1e-3


class CheckpointError(ValueError):
  """A checkpoint that does not fit the architecture (or is not a checkpoint at all)."""


@dataclasses.dataclass
class LoadReport:
  source: str
  format: str
  loaded: list = dataclasses.field(default_factory=list)  # (flax path, shape, checkpoint name)
  folded_batch_norms: int = 0
  eps: float | None = None
  dequantized: int = 0
  notes: list = dataclasses.field(default_factory=list)

  @property
  def num_tensors(self) -> int:
    return len(self.loaded)

  @property
  def num_values(self) -> int:
    return int(sum(np.prod(s) for _, s, _ in self.loaded))

  def summary(self) -> str:
    lines = [f"loaded {self.num_tensors} tensors ({self.num_values:,} values) from {self.format} checkpoint "
             f"{self.source}"]
    if self.folded_batch_norms:
      lines.append(f"folded {self.folded_batch_norms} batch norms (eps {self.eps})")
    if self.dequantized:
      lines.append(f"dequantized {self.dequantized} integer tensors with their scales and zero points")
    lines += self.notes
    return "\n".join(lines)

  def to_dict(self) -> dict:
    return dict(source=self.source, format=self.format, num_tensors=self.num_tensors, num_values=self.num_values,
                folded_batch_norms=self.folded_batch_norms, eps=self.eps, dequantized=self.dequantized,
                notes=list(self.notes), tensors=[dict(path=p, shape=list(map(int, s)), name=n)
                                                 for p, s, n in self.loaded])


# ---------------------------------------------------------------------------------------------------------------------
# The model side: expected shapes.


def expected_params(model, image_size: int = 224):
  """The model's parameter tree of ShapeDtypeStructs (no computation)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]


def call_order(model, classes, image_size: int = 224, params=None, variables=None, mutable=False) -> list[str]:
  """Paths of the ``classes`` submodules in the order they are called (traced only; no computation)."""
  import flax.linen as nn

  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, classes) and context.method_name == "__call__":
      path = "/".join(context.module.path)
      if path not in order:
        order.append(path)
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    if variables is None:
      jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    else:
      jax.eval_shape(lambda v: model.apply(v, x, mutable=mutable), variables)
  return order


def ordered_layers(model, image_size: int = 224) -> list[tuple[str, dict]]:
  """``(path, {'kernel': ShapeDtypeStruct, 'bias': ...})`` of every conv/dense layer in execution order."""
  from fatq.layers import QConv, QDense

  shapes = dict(model_layers(expected_params(model, image_size)))
  return [(p, shapes[p]) for p in call_order(model, (QConv, QDense), image_size)]


def _set(tree: dict, path: str, name: str, value: np.ndarray) -> None:
  node = tree
  for k in path.split("/"):
    node = node.setdefault(k, {})
  node[name] = jnp.asarray(value, jnp.float32)


def _check(path: str, what: str, got, want, ckpt_name: str, model=None, first: bool = True) -> None:
  """Refuse a checkpoint tensor of the wrong shape. ``first``: no layer was loaded before this one, so that channel
  counts that differ point to the width multiplier (a width changes the first layer already); past it, to the
  architecture."""
  if tuple(got) == tuple(want):
    return
  hint = ""
  if path.endswith("logits") and tuple(got[:-1]) == tuple(want[:-1]):
    hint = (f"; the checkpoint has {got[-1]} classes but the model was configured with {want[-1]} "
            f"(set num_classes={got[-1]}: 1000 for Keras, 1001 for TF-slim/TFLite models)")
  elif not first:
    hint = "; the layers before it matched, so the checkpoint is likely of another architecture or block layout"
  elif len(got) == len(want) and got[-1] != want[-1] and model is not None and hasattr(model, "width"):
    ratio = got[-1] / want[-1] * model.width
    hint = (f"; the channel counts differ by a factor {got[-1] / want[-1]:.3g}: the checkpoint looks like width "
            f"multiplier ~{ratio:.3g}, the model was configured with width={model.width}")
  raise CheckpointError(f"checkpoint tensor {ckpt_name!r} has shape {tuple(got)}, but {path}/{what} expects shape "
                        f"{tuple(want)}{hint}")


# ---------------------------------------------------------------------------------------------------------------------
# Keras names (keras.applications MobileNet / MobileNetV2).


def keras_layer_map(model) -> dict[str, tuple[str, str | None]]:
  """Flax layer path -> (Keras conv/dense layer name, Keras batch-norm layer name or None)."""
  from fatq.models.mobilenet_v1 import MobileNetV1
  from fatq.models.mobilenet_v2 import MobileNetV2

  m: dict[str, tuple[str, str | None]] = {}
  if isinstance(model, MobileNetV1):
    m["conv1"] = ("conv1", "conv1_bn")
    for i in range(1, len(model.blocks) + 1):
      m[f"block{i}/depthwise"] = (f"conv_dw_{i}", f"conv_dw_{i}_bn")
      m[f"block{i}/pointwise"] = (f"conv_pw_{i}", f"conv_pw_{i}_bn")
    m["logits"] = ("conv_preds", None)
  elif isinstance(model, MobileNetV2):
    m["conv1"] = ("Conv1", "bn_Conv1")
    n = sum(s[2] for s in model.stages)
    for i in range(n):
      prefix = "expanded_conv" if i == 0 else f"block_{i}"
      sep = "_" if i else "_"
      if i:
        m[f"block{i}/expand"] = (f"{prefix}{sep}expand", f"{prefix}{sep}expand_BN")
      m[f"block{i}/depthwise"] = (f"{prefix}{sep}depthwise", f"{prefix}{sep}depthwise_BN")
      m[f"block{i}/project"] = (f"{prefix}{sep}project", f"{prefix}{sep}project_BN")
    m["head"] = ("Conv_1", "Conv_1_bn")
    m["logits"] = ("predictions", None)
  else:
    raise CheckpointError(f"no Keras weight names are known for {type(model).__name__}; Keras checkpoints are "
                          "supported for MobileNet v1 and v2 (keras.applications); use a TFLite file for MnasNet")
  return m


def _keras_weight(layer: dict, names: tuple[str, ...]):
  for n in names:
    if n in layer:
      return n, layer[n]
  return None, None


def load_keras_weights(model, weights: dict[str, dict[str, np.ndarray]], eps: float | dict, source: str,
                       fmt: str, image_size: int = 224):
  """Map Keras layer weights ``{layer: {weight: array}}`` onto ``model``'s params, folding batch norm."""
  table = keras_layer_map(model)
  report = LoadReport(source, fmt, eps=eps if isinstance(eps, float) else None)
  params: dict = {}
  used = set()
  for path, exp in ordered_layers(model, image_size):
    if path not in table:
      raise CheckpointError(f"internal: no Keras name for layer {path}")
    conv_name, bn_name = table[path]
    if conv_name not in weights:
      raise CheckpointError(f"checkpoint {source} has no layer {conv_name!r} (expected for {path}/kernel with shape "
                            f"{tuple(exp['kernel'].shape)})")
    layer = weights[conv_name]
    used.add(conv_name)
    kname, k = _keras_weight(layer, ("depthwise_kernel", "kernel"))
    if k is None:
      raise CheckpointError(f"checkpoint layer {conv_name!r} has no kernel (found {sorted(layer)}); {path}/kernel "
                            f"expects shape {tuple(exp['kernel'].shape)}")
    want = tuple(exp["kernel"].shape)
    k = np.asarray(k, np.float32)
    if path.endswith("depthwise") and k.ndim == 4 and k.shape[3] == 1 and want[2] == 1:
      k = k.transpose(0, 1, 3, 2)  # Keras HW(C)(multiplier=1) -> fatq HW1C
    if len(want) == 2 and k.ndim == 4 and k.shape[:2] == (1, 1):
      k = k.reshape(k.shape[2:])  # 1x1 conv classifier (conv_preds) -> dense
    _check(path, "kernel", k.shape, want, f"{conv_name}/{kname}", model, first=not params)
    bias = layer.get("bias")
    if bn_name is not None:
      if bn_name not in weights:
        raise CheckpointError(f"checkpoint {source} has no batch norm layer {bn_name!r} (needed to fold into {path}, "
                              f"{want[-1]} channels)")
      bn = weights[bn_name]
      used.add(bn_name)
      missing = [n for n in ("gamma", "beta", "moving_mean", "moving_variance") if n not in bn]
      if missing:
        raise CheckpointError(f"batch norm layer {bn_name!r} lacks {missing}; expected 4 vectors of shape "
                              f"({want[-1]},)")
      for n in ("gamma", "beta", "moving_mean", "moving_variance"):
        _check(path, f"batch norm {n}", np.shape(bn[n]), (want[-1],), f"{bn_name}/{n}", model, first=not params)
      e = eps.get(bn_name, KERAS_BN_EPS) if isinstance(eps, dict) else eps
      k, bias = fold_batch_norm(k, bias, bn["gamma"], bn["beta"], bn["moving_mean"], bn["moving_variance"], e)
      report.folded_batch_norms += 1
      if isinstance(eps, dict):
        report.eps = e
    if bias is None:
      raise CheckpointError(f"checkpoint layer {conv_name!r} has no bias (expected shape ({want[-1]},))")
    _check(path, "bias", np.shape(bias), (want[-1],), f"{conv_name}/bias", model, first=not params)
    _set(params, path, "kernel", k)
    _set(params, path, "bias", np.asarray(bias, np.float32))
    report.loaded.append((f"{path}/kernel", want, f"{conv_name}/{kname}"))
    report.loaded.append((f"{path}/bias", (want[-1],), f"{conv_name}/bias" + (f"+{bn_name}" if bn_name else "")))
  extra = sorted(n for n, w in weights.items() if w and n not in used)
  if extra:
    first = extra[0]
    shapes = {k: tuple(np.shape(v)) for k, v in weights[first].items()}
    raise CheckpointError(f"checkpoint {source} has {len(extra)} layer(s) the model does not use, e.g. {first!r} "
                          f"with tensors {shapes}: {extra[:6]}{' ...' if len(extra) > 6 else ''} (wrong "
                          f"architecture or number of blocks?)")
  return params, report


def read_keras_h5(path: str | os.PathLike) -> tuple[dict, dict | float]:
  """``({layer: {weight: array}}, eps)`` from a Keras ``.h5`` (full model or weights-only, TF2 / Keras 3 legacy
  layout). ``eps`` is ``{bn layer: eps}`` from the stored model config, or the Keras default 1e-3."""
  import zipfile

  import h5py

  if zipfile.is_zipfile(path):
    raise CheckpointError(f"{path} is a Keras 3 '.keras' archive, which fatq does not read; save the model as HDF5 "
                          "with model.save('model.h5') and pass that file")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise CheckpointError(f"{path} is not an HDF5 (Keras .h5) checkpoint: {e}") from None
  with f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layers" in root and "vars" in root and "layer_names" not in root.attrs:
      raise CheckpointError(f"{path} is a Keras 3 '.weights.h5' file, which stores no layer names; save the model "
                            "with model.save('model.h5') or use keras.applications' downloadable .h5 weights")
    weights: dict[str, dict[str, np.ndarray]] = {}

    def visit(name, obj):
      if isinstance(obj, h5py.Dataset):
        parts = name.split("/")
        layer, wname = parts[0], parts[-1].split(":")[0]
        weights.setdefault(layer, {})[wname] = np.asarray(obj)

    root.visititems(visit)
    if not weights:
      raise CheckpointError(f"{path} holds no weight tensors")
    eps: dict | float = KERAS_BN_EPS
    cfg = f.attrs.get("model_config")
    if cfg is not None:
      cfg = json.loads(cfg.decode() if isinstance(cfg, bytes) else cfg)
      eps = _bn_eps_from_config(cfg)
  return weights, eps


def stored_keras_padding(path: str | os.PathLike, fmt: str) -> bool | None:
  """Whether the Keras model stored at ``path`` pads its stride-2 convolutions with ZeroPadding2D layers (Keras 2.2
  and later; then VALID), read from the stored topology: False if it has none (Keras 2.1's MobileNet used SAME, as
  the tfjs checkpoint of ../shared/data does), None if the file stores no topology or cannot be read (weights-only
  files; the loader reports a damaged one). The two agree on even sizes such as 224, not on odd ones."""
  try:
    if fmt == "tfjs":
      mj = Path(path) / "model.json" if Path(path).is_dir() else Path(path)
      topology = json.loads(mj.read_text()).get("modelTopology")
    elif fmt == "keras_h5":
      import h5py

      with h5py.File(path, "r") as f:
        topology = f.attrs.get("model_config")
      topology = json.loads(topology.decode() if isinstance(topology, bytes) else topology) if topology else None
    else:
      return None
  except (OSError, ValueError, AttributeError):
    return None
  return None if not topology else '"ZeroPadding2D"' in json.dumps(topology)


def _bn_eps_from_config(cfg) -> dict:
  eps = {}

  def walk(o):
    if isinstance(o, dict):
      if o.get("class_name") == "BatchNormalization" and "config" in o:
        eps[o["config"]["name"]] = float(o["config"].get("epsilon", KERAS_BN_EPS))
      for v in o.values():
        walk(v)
    elif isinstance(o, list):
      for v in o:
        walk(v)

  walk(cfg)
  return eps


def read_tfjs(path: str | os.PathLike) -> tuple[dict, dict | float]:
  """``({layer: {weight: array}}, eps)`` from a TensorFlow.js layers model (``model.json`` + binary shards)."""
  path = Path(path)
  mj = path / "model.json" if path.is_dir() else path
  try:
    manifest = json.loads(mj.read_text())
    groups = manifest["weightsManifest"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{mj} is not a TensorFlow.js layers model.json (with a weightsManifest): {e}") from None
  weights: dict[str, dict[str, np.ndarray]] = {}
  dtypes = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "uint16": np.uint16}
  for g in groups:
    data = b"".join((mj.parent / p).read_bytes() for p in g["paths"])
    offset = 0
    for w in g["weights"]:
      if "quantization" in w:
        raise CheckpointError(f"tfjs weight {w['name']!r} is quantized; convert the model without quantization")
      if w.get("dtype") not in dtypes:
        raise CheckpointError(f"tfjs weight {w['name']!r} has dtype {w.get('dtype')!r}; fatq reads "
                              f"{sorted(dtypes)} (re-convert the model with float32 weights)")
      dt = np.dtype(dtypes[w["dtype"]]).newbyteorder("<")
      n = int(np.prod(w["shape"])) if w["shape"] else 1
      size = n * dt.itemsize
      if offset + size > len(data):
        raise CheckpointError(f"tfjs shards of group {g['paths']} end before weight {w['name']!r} "
                              f"(shape {w['shape']}): truncated checkpoint")
      arr = np.frombuffer(data, dt, n, offset).reshape(w["shape"]).astype(dtypes[w["dtype"]])
      offset += size
      name = w["name"].split(":")[0]
      layer, wname = name.rsplit("/", 1) if "/" in name else (name, name)
      weights.setdefault(layer, {})[wname] = arr
  topo = manifest.get("modelTopology")
  eps = _bn_eps_from_config(topo) if topo else KERAS_BN_EPS
  return weights, (eps or KERAS_BN_EPS)


# ---------------------------------------------------------------------------------------------------------------------
# TFLite.

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _interpreter(path):
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:  # pragma: no cover
    import tensorflow as tf
    Interpreter = tf.lite.Interpreter
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"TFLite file {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(8)
  if len(head) < 8 or head[4:8] != b"TFL3":
    raise CheckpointError(f"{path} is not a TFLite flatbuffer (no 'TFL3' identifier)")
  try:
    it = Interpreter(model_path=path, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
  except (ValueError, RuntimeError) as e:
    raise CheckpointError(f"{path} could not be read as a TFLite model: {e}") from None
  return it


class TFLiteGraph:
  """Operators and tensors of a TFLite file, with dequantization of constant tensors."""

  def __init__(self, path):
    self.path = str(path)
    self.interpreter = _interpreter(path)
    self.tensors = {t["index"]: t for t in self.interpreter.get_tensor_details()}
    self.ops = [o for o in self.interpreter._get_ops_details() if o["op_name"] != "DELEGATE"]
    self.producers = {t: o for o in self.ops for t in o["outputs"]}

  def name(self, i: int) -> str:
    return self.tensors[i]["name"]

  def qparams(self, i: int):
    q = self.tensors[i]["quantization_parameters"]
    return np.asarray(q["scales"], np.float64), np.asarray(q["zero_points"], np.int64), int(q["quantized_dimension"])

  def is_quantized(self, i: int) -> bool:
    return self.tensors[i]["dtype"] not in (np.float32, np.float16) and len(self.qparams(i)[0]) > 0

  def value(self, i: int) -> tuple[np.ndarray, bool]:
    """Constant tensor ``i`` as float32 (dequantized ``(q - zero_point) * scale`` if integer) and whether it was.

    A weight that a DEQUANTIZE operator computes (float16 files, some others) is read from that operator's input: the
    interpreter only allocates the file, so the operator's output holds no values yet."""
    op = self.producers.get(i)
    if op is not None:
      if op["op_name"] != "DEQUANTIZE":
        raise CheckpointError(f"TFLite tensor {self.name(i)!r} of {self.path} is computed by a {op['op_name']} "
                              "operator, not stored in the file; fatq reads weights stored as float32, float16 or "
                              "int8/uint8 constants (re-convert the model without that optimization)")
      return self.value(op["inputs"][0])
    a = self.interpreter.get_tensor(i)
    if a.dtype in (np.float32, np.float16, np.float64):
      return a.astype(np.float32), False
    scales, zps, axis = self.qparams(i)
    if len(scales) == 0:
      raise CheckpointError(f"TFLite tensor {self.name(i)!r} is {a.dtype} without quantization parameters")
    shape = [1] * a.ndim
    if len(scales) > 1:
      shape[axis] = -1
    return ((a.astype(np.float64) - zps.reshape(shape)) * scales.reshape(shape)).astype(np.float32), True

  def range(self, i: int) -> tuple[float, float]:
    """The real range an integer activation tensor covers: ``[(qmin - zp) s, (qmax - zp) s]``."""
    scales, zps, _ = self.qparams(i)
    info = np.iinfo(self.tensors[i]["dtype"])
    return float((info.min - zps[0]) * scales[0]), float((info.max - zps[0]) * scales[0])

  def conv_ops(self):
    return [o for o in self.ops if o["op_name"] in _CONV_OPS]


def _tflite_kernel(op_name: str, w: np.ndarray, want: tuple) -> np.ndarray:
  if op_name == "CONV_2D":  # OHWI -> HWIO
    w = w.transpose(1, 2, 3, 0)
    if len(want) == 2 and w.shape[:2] == (1, 1):
      w = w.reshape(w.shape[2:])  # 1x1 conv classifier -> dense
  elif op_name == "DEPTHWISE_CONV_2D":  # 1HWC -> HW1C
    w = w.transpose(1, 2, 0, 3)
  else:  # FULLY_CONNECTED: (out, in) -> (in, out)
    w = w.T
  return w


def load_tflite(model, path, image_size: int = 224):
  """Float params for ``model`` from a TFLite file (float, or integer-quantized and dequantized here)."""
  g = TFLiteGraph(path)
  expected = ordered_layers(model, image_size)
  convs = g.conv_ops()
  report = LoadReport(str(path), "tflite")
  params: dict = {}
  try:
    for (path_, exp), op in zip(expected, convs):  # the first layer that differs is named; then the count
      want = tuple(exp["kernel"].shape)
      wi = op["inputs"][1]
      w, deq = g.value(wi)
      report.dequantized += deq
      got = _tflite_kernel(op["op_name"], w, want)
      _check(path_, "kernel", got.shape, want, g.name(wi), model, first=not params)
      if path_.endswith("depthwise") != (op["op_name"] == "DEPTHWISE_CONV_2D"):
        raise CheckpointError(f"TFLite operator {op['op_name']} with weights {g.name(wi)!r} sits where the model has "
                              f"{path_} (kernel shape {want}): graph and architecture differ")
      bi = op["inputs"][2] if len(op["inputs"]) > 2 else -1
      if bi >= 0:
        b, deq = g.value(bi)
        report.dequantized += deq
        _check(path_, "bias", b.shape, (want[-1],), g.name(bi), model, first=not params)
      else:
        b = np.zeros(want[-1], np.float32)
      _set(params, path_, "kernel", got)
      _set(params, path_, "bias", b)
      report.loaded.append((f"{path_}/kernel", want, g.name(wi)))
      report.loaded.append((f"{path_}/bias", (want[-1],), g.name(bi) if bi >= 0 else "(none: zeros)"))
  except CheckpointError as e:
    if len(convs) == len(expected):
      raise
    raise CheckpointError(f"{e}; the file has {len(convs)} convolution/dense operators and the model {len(expected)} "
                          "conv/dense layers: likely another architecture") from None
  if len(convs) != len(expected):
    n_fc = sum(o["op_name"] == "FULLY_CONNECTED" for o in convs)
    have = [g.name(o["inputs"][1]) for o in convs]
    raise CheckpointError(
        f"TFLite file {path} has {len(convs)} convolution/dense operators ({n_fc} FULLY_CONNECTED), the model has "
        f"{len(expected)} conv/dense layers; the first {min(len(convs), len(expected))} match, then "
        + (f"checkpoint tensor {have[len(expected)]!r} is extra" if len(convs) > len(expected) else
           f"{expected[len(convs)][0]}/kernel with shape {tuple(expected[len(convs)][1]['kernel'].shape)} is missing"))
  report.notes.append("batch norm already folded in the TFLite graph")
  return params, report


class TFLiteQuantState(NamedTuple):
  model: Any  # the module with ``quant`` set (and ``quantize_pool`` when the file requantizes its pool)
  config: Any  # QuantConfig
  stats: dict  # quant_stats
  grids: dict  # {point name: QuantParams}: the file's scales and zero points, for fatq.layers.integer_arithmetic
  scheme: str  # the file's stored codes: 'int8' or 'uint8'


def tflite_quant_state(model, path, image_size: int = 224, params=None) -> TFLiteQuantState:
  """``(model, QuantConfig, quant_stats)`` reproducing a quantized TFLite file's own ranges in fatq.

  Activations (input, every conv/dense output, every residual add) get asymmetric 8-bit specs with the file's
  ``[(qmin - zp) s, (qmax - zp) s]`` as fixed (non-trainable) ranges; weights get per-channel symmetric specs
  (int8 files) or per-tensor asymmetric ones (uint8 files) with the file's scales. ``nudge`` then recovers the file's
  scales and zero points (up to a float32 ulp of XLA's arithmetic); ``grids`` holds them as stored, so that
  ``fatq.layers.integer_arithmetic(state.grids, state.scheme)`` evaluates the model in the file's own integer
  arithmetic.
  """
  from fatq.config import QuantConfig, QuantRule, QuantSpec

  g = TFLiteGraph(path)
  convs = g.conv_ops()
  adds = [o for o in g.ops if o["op_name"] == "ADD"]
  if not convs or not g.is_quantized(convs[0]["inputs"][1]):
    raise CheckpointError(f"{path} is not an integer-quantized TFLite model (its weights are float)")
  if not g.is_quantized(convs[0]["inputs"][0]):
    raise CheckpointError(f"{path} quantizes its weights only (dynamic range): its activations are float and have no "
                          "ranges to reproduce; convert it with a representative dataset for full-integer quantization")
  per_channel = len(g.qparams(convs[0]["inputs"][1])[0]) > 1
  act = QuantSpec(bits=8, symmetric=False, trainable=False)
  weight = (QuantSpec(bits=8, symmetric=True, per_channel=True, trainable=False) if per_channel
            else QuantSpec(bits=8, symmetric=False, trainable=False))
  config = QuantConfig((QuantRule(r".*kernel", weight), QuantRule(r".*", act)))
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  if params is None:
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), expected_params(model, image_size))
  pools = [o for o in g.ops if o["op_name"] in ("MEAN", "AVERAGE_POOL_2D")]
  requantized_pool = bool(pools) and g.qparams(pools[-1]["inputs"][0])[0][0] != g.qparams(pools[-1]["outputs"][0])[0][0]
  qmodel = model.clone(quant=config, quantize_pool=requantized_pool)
  from fatq.layers import FakeQuant

  skeleton = jax.eval_shape(lambda: qmodel.apply({"params": params}, x, mutable=["quant_stats"])[1])["quant_stats"]
  order = call_order(qmodel, FakeQuant, image_size, variables={"params": params}, mutable=["quant_stats"])
  points = []
  for p in order:
    node = skeleton
    for k in p.split("/"):
      node = node[k]
    points.append((p.removesuffix("_quant"), node))
  stats: dict = {}
  grids: dict = {}
  ci = ai = 0
  op = None
  for name, shapes in points:
    role = name.rsplit("/", 1)[-1]
    if role == "input":
      t = convs[0]["inputs"][0]
      lo, hi = g.range(t)
    elif role == "kernel":
      if ci >= len(convs):
        raise CheckpointError(f"{path}: no convolution operator left for {name}")
      op = convs[ci]
      ci += 1
      t = wi = op["inputs"][1]
      scales, zps, _ = g.qparams(wi)
      info = np.iinfo(g.tensors[wi]["dtype"])
      if per_channel:
        lo, hi = -127.0 * scales, 127.0 * scales
      else:
        lo, hi = float((info.min - zps[0]) * scales[0]), float((info.max - zps[0]) * scales[0])
    elif role == "output":
      t = op["outputs"][0]
      lo, hi = g.range(t)
    elif role == "pool":
      t = pools[-1]["outputs"][0]
      lo, hi = g.range(t)
    elif role == "add":
      if ai >= len(adds):
        raise CheckpointError(f"{path}: the model has a residual add {name} the file lacks")
      t = adds[ai]["outputs"][0]
      lo, hi = g.range(t)
      ai += 1
    else:
      raise CheckpointError(f"no TFLite range for quantization point {name}")
    grids[name] = _grid(g, t, narrow=role == "kernel" and per_channel)
    node = stats
    for k in name.split("/")[:-1]:
      node = node.setdefault(k, {})
    node[f"{role}_quant"] = {"min": jnp.asarray(lo, jnp.float32).reshape(shapes["min"].shape),
                             "max": jnp.asarray(hi, jnp.float32).reshape(shapes["max"].shape)}
  if ci != len(convs) or ai != len(adds):
    raise CheckpointError(f"{path}: {len(convs)} conv and {len(adds)} add operators, the model matched {ci} and {ai}")
  scheme = "uint8" if g.tensors[convs[0]["inputs"][1]]["dtype"] == np.uint8 else "int8"
  return TFLiteQuantState(qmodel, config, stats, grids, scheme)


def _grid(g: TFLiteGraph, t: int, narrow: bool):
  """Tensor ``t``'s scale and zero point in fatq's terms (:class:`fatq.quantizers.QuantParams`: the zero point on
  the unsigned grid ``[qmin, qmax]``, which is ``[1, 255]`` for narrow symmetric int8 weights)."""
  from fatq.quantizers import QuantParams

  scales, zps, _ = g.qparams(t)
  shift = 128 if g.tensors[t]["dtype"] == np.int8 else 0
  return QuantParams(scales.astype(np.float32), (zps + shift).astype(np.float32), 1 if narrow else 0, 255)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point by format.

FORMATS = ("keras_h5", "tfjs", "tflite")


def guess_format(path) -> str:
  p = Path(path)
  if p.is_dir() or p.name == "model.json":
    return "tfjs"
  if p.suffix in (".h5", ".hdf5", ".keras"):
    return "keras_h5"
  if p.suffix == ".tflite":
    return "tflite"
  raise CheckpointError(f"cannot tell the format of {path}; set checkpoint_format to one of {FORMATS}")


def load_checkpoint(model, path, fmt: str | None = None, image_size: int = 224):
  """``(params, LoadReport)`` for ``model`` from ``path`` in format ``fmt`` (guessed from the name if None). A ``fmt``
  that the name contradicts (a ``.h5`` file read as tfjs, ...) is refused: a config's format is that of its default
  file, and a user's own file in another format would otherwise fail deep in the wrong reader."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  try:
    named = guess_format(path)
  except CheckpointError:
    if not fmt:
      raise
    named = fmt  # a name that tells nothing (no known suffix): the format given
  if fmt and named != fmt:
    raise CheckpointError(f"{path} is named like a {named!r} checkpoint, not {fmt!r}: set checkpoint_format to "
                          f"{named!r} (in a config: --config.model.checkpoint_format={named}), or to '' to tell the "
                          "format from the name")
  fmt = named
  if fmt == "tflite":
    return load_tflite(model, path, image_size)
  if fmt == "keras_h5":
    weights, eps = read_keras_h5(path)
  elif fmt == "tfjs":
    weights, eps = read_tfjs(path)
  else:
    raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
  return load_keras_weights(model, weights, eps, str(path), fmt, image_size)
