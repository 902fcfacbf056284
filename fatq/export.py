"""Export a (fine-tuned) fatq model to a full-integer TensorFlow Lite model and a TFLite-terms thresholds file.

One general mechanism, no per-architecture code:

1. The model is traced to a jaxpr (batch 1, parameters as constants) inside :func:`fatq.layers.export_markers`, where
   every calibrated FakeQuant emits the identity primitive ``fatq_quant_marker`` (carrying its point name) instead of
   the fake-quant arithmetic.
2. The jaxpr is translated equation by equation into TensorFlow ops over a small primitive set (convolutions incl.
   depthwise, matmul, elementwise arithmetic, pooling, reductions, reshapes, pads, slices, concatenation). A marker
   becomes ``tf.quantization.fake_quant_with_min_max_vars`` (activations, per tensor) or ``..._per_channel`` (weights)
   at the *nudged* range that the JAX model uses (:func:`fatq.calibration.quant_ranges`). An unsupported primitive
   raises an error naming it.
3. TensorFlow's own converter (``TFLiteConverter.from_concrete_functions``, ``optimizations=[DEFAULT]``) turns the
   fake-quant graph into a full-integer model whose scales and zero points are exactly those ranges (SPEC §3).
   No flatbuffer is written by hand.

Translation rules worth knowing:

* ``jnp.mean`` over the spatial axes of an NHWC tensor (``reduce_sum`` then a division by the count) becomes
  ``AVERAGE_POOL_2D`` over the whole map plus a reshape: an integer op that keeps its input's scale and zero point.
  A model without a quantizer after the mean therefore computes it on the input's grid in TFLite (at most half a step
  of rounding that the JAX model does not have); :func:`tie_pool` gives the JAX model the same rounding.
* Biases are int32 codes ``round(b / (s_in * s_w))``; the JAX model's float biases differ by up to half that step,
  which can be a sizeable part of an output step where weights are large. :meth:`Exported.snap_biases` gives the
  JAX model the exported biases (used by :func:`export_and_check`).
* Weight channels whose scale TFLite cannot use as it is (a range under the converter's 1e-6 floor, or so small that
  the int32 bias code would overflow) get the smallest usable scale (:meth:`Exported._fit_weight_scales`); the
  changes are listed in thresholds.json (``adjusted``).
* Bias constants are always exported as full per-output-channel vectors (a scalar bias after a per-channel conv is
  mis-quantized by the converter, SPEC §3). The converter also folds an all-equal, non-zero bias vector into a splat
  constant and quantizes it with channel 0's scale (measured here: every channel got the same int32 code); such a
  vector gets one ulp added to its last element, which leaves the int32 codes unchanged.
* ``x @ W`` with per-channel weights becomes a 1x1 ``CONV_2D`` (the converter cannot move a per-axis quantized IO
  matrix into FULLY_CONNECTED's OI layout); with per-tensor weights it is ``FULLY_CONNECTED``.

Schemes (``thresholds.json`` and the checks on the model's quantization modes):

* ``int8``: per-channel (or per-tensor) symmetric int8 weights in ``[-127, 127]`` with zero point 0, int8 asymmetric
  per-tensor activations, int32 biases with scale ``s_in * s_w``. Asymmetric weights are refused, unless the caller
  passes ``asymmetric_weights='symmetrize'``: each weight range becomes ``[-t, t]`` with ``t = max(|lo|, |hi|)``
  (a documented rule that changes the model; the JAX model no longer matches exactly).
* ``uint8``: the legacy per-tensor scheme of the FAT paper's models (uint8 weights and activations, zero point =
  int8 zero point + 128). Per-channel weights are refused. TensorFlow 2's converter writes int8 tensors internally
  (only the input and output can be uint8), so ``model.tflite`` for this scheme holds the same scales with int8 zero
  points (uint8 - 128) for activations; thresholds.json gives the uint8 terms.
* Grids narrower than 8 bits (e.g. a W4A4 row) are carried in the 8-bit tensors at the same scale: the converter
  rejects sub-8-bit tensors (``tfl.conv_2d`` has no i4 operands, also with ``_experimental_low_bit_qat``), so
  weights are quantized on their n-bit grid here and stored as int8 codes (4 bits: ``[-7, 7]``), and an activation's
  n-bit range becomes MINIMUM / MAXIMUM ops before its quantization (4 bits: 16 of the 256 codes,
  ``codes`` in thresholds.json). The interpreter computes the n-bit model; the file is no smaller than an 8-bit one.
* Per-channel activations and more than 8 bits are refused by both schemes, naming the tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np

from fatq.calibration import quant_ranges
from fatq.fileio import write_bytes, write_text
from fatq.integer import IntegerModel, UnsupportedOpError, cut_model, input_codes, output_values
from fatq.layers import RELU6_BOUND, export_markers, fold_biases, integer_arithmetic
from fatq.quantizers import QuantParams, quantize

Tree = Any
SCHEMES = ("int8", "uint8")
IO_TYPES = ("int8", "uint8", "float32")


# The converter floors a weight channel's range at this (measured: 1e-6 / 254 scales for [-127, 127] grids).
_MIN_WEIGHT_RANGE = 1e-6
# Bias codes stay within +-2^30: TFLite adds them to int32 accumulators (|sum of products| < 2^26 here).
_BIAS_LIMIT = 2.0**30


class ExportError(ValueError):
  """A model or quantization mode that the chosen TFLite scheme (or the translator) cannot express, or an export that
  cannot be written."""


# ---------------------------------------------------------------------------------------------------------------------
# Quantization points in TFLite terms.


@dataclasses.dataclass
class Point:
  name: str
  kind: str  # 'weight' | 'activation'
  bits: int
  scale: np.ndarray  # () or (C,)
  zero_point: np.ndarray  # on the unsigned grid [qmin, qmax], same shape as scale
  qmin: int
  qmax: int
  channel_axis: int | None  # axis of the fatq tensor for per-channel points
  # the grid of the fake-quant model (scale and zero point above may be changed for TFLite: dead channels, raised
  # weight scales, symmetrized weights)
  model_scale: np.ndarray | None = None
  model_zero_point: np.ndarray | None = None
  model_qmin: int | None = None

  def __post_init__(self):
    if self.model_scale is None:
      self.model_scale, self.model_zero_point = np.array(self.scale), np.array(self.zero_point)
    if self.model_qmin is None:
      self.model_qmin = self.qmin

  @property
  def narrow(self) -> bool:
    return self.qmin == 1

  @property
  def nudged_min(self) -> np.ndarray:
    return ((self.qmin - self.zero_point) * self.scale).astype(np.float32)

  @property
  def nudged_max(self) -> np.ndarray:
    return ((self.qmax - self.zero_point) * self.scale).astype(np.float32)

  @property
  def offset(self) -> int:
    """Shift from this point's unsigned n-bit codes to the 8-bit carrier's: an n-bit grid (n < 8) is stored as the
    codes ``[qmin, qmax] + offset`` of an int8 tensor with the same scale (e.g. 4 bits: int8 codes -8..7)."""
    return 2**7 - 2 ** (self.bits - 1)

  @property
  def carrier_min(self) -> np.ndarray:
    """The 8-bit range (same scale, zero point shifted by ``offset``) whose grid contains this point's grid."""
    return self._carrier()[0]

  @property
  def carrier_max(self) -> np.ndarray:
    return self._carrier()[1]

  def _carrier(self) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``; ``hi`` (and ``lo = -hi`` of a symmetric range) moved by a few float32 ulps where needed so that
    the converter, which computes the scale again from the limits, gets exactly ``scale`` (:func:`_limit_for_scale`)."""
    lo = ((self.qmin - self.zero_point - self.offset) * self.scale).astype(np.float32)
    hi = ((255 - self.zero_point - self.offset) * self.scale).astype(np.float32)
    hi = _limit_for_scale(lo, hi, self.scale, 255 - self.qmin)
    return (-hi if np.all(lo == -((255 - self.zero_point - self.offset) * self.scale).astype(np.float32)) else lo), hi


def _limit_for_scale(lo: np.ndarray, hi: np.ndarray, scale: np.ndarray, levels: int, max_ulps: int = 16) -> np.ndarray:
  """The float32 ``hi'`` nearest ``hi`` with ``(hi' - lo) / levels == scale`` in float32 and in float64 rounded to
  float32 (the converter's fake-quant nudging; for a symmetric range ``lo = -hi`` this is ``hi' / (levels / 2)``).

  ``(qmax - z) s`` rounded to float32 gives back ``s`` after that division only most of the time (measured: 2 of 120
  channels of a LeNet-5 layer came out 1 ulp lower in model.tflite); the exported scale must be the trained one
  exactly, for the file to compute what fatq's integer arithmetic does (``fatq.layers.integer_arithmetic``).
  """
  lo, hi, scale = (np.asarray(a, np.float32) for a in (lo, hi, scale))
  symmetric = np.all(lo == -hi)

  def exact(h):
    low = -h if symmetric else lo
    f32 = (h - low) / np.float32(levels)
    f64 = ((h.astype(np.float64) - low.astype(np.float64)) / levels).astype(np.float32)
    return (f32 == scale) & (f64 == scale)

  best, found = hi.copy(), exact(hi)
  for k in range(1, max_ulps + 1):
    for direction in (np.inf, -np.inf):
      h = hi
      for _ in range(k):
        h = np.nextafter(h, np.float32(direction))
      ok = exact(h) & ~found
      best, found = np.where(ok, h, best), found | ok
  return best.astype(np.float32)


def _points(ranges: dict[str, dict[str, np.ndarray]], weight_names: set[str]) -> dict[str, Point]:
  out = {}
  for name, r in ranges.items():
    scale = np.asarray(r["scale"], np.float32)
    out[name] = Point(name=name, kind="unknown", bits=int(r["bits"]),
                      scale=scale, zero_point=np.asarray(r["zero_point"], np.float32), qmin=int(r["qmin"]),
                      qmax=int(r["qmax"]), channel_axis=None if scale.ndim == 0 else -1)
  return out


def _check_point(p: Point, scheme: str, asymmetric_weights: str) -> None:
  """Refuse (or, for asymmetric int8 weights with ``asymmetric_weights='symmetrize'``, convert) what ``scheme`` cannot
  represent."""
  if scheme not in SCHEMES:
    raise ExportError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
  if p.bits > 8:
    raise ExportError(f"tensor {p.name!r}: {p.bits}-bit quantization cannot be represented in the TFLite {scheme} "
                      "scheme (at most 8 bits; narrower grids are carried in 8-bit tensors)")
  if p.kind == "activation" and p.scale.ndim:
    raise ExportError(f"tensor {p.name!r}: per-channel activation ranges cannot be represented in the TFLite "
                      f"{scheme} scheme (activations are per tensor)")
  if p.kind == "weight" and scheme == "uint8" and p.scale.ndim:
    raise ExportError(f"tensor {p.name!r}: per-channel weights cannot be represented in the legacy uint8 scheme "
                      "(per tensor only); export with scheme='int8' or fine-tune in scalar mode")
  if p.kind == "weight":
    # An all-zero weight channel (calibrated range [0, 0]) has a degenerate range (scale ~4e-11, zero point on the
    # grid's edge). Its weights quantize to 0 at any scale; give it the median scale of the other channels and a
    # centred zero point, so that it is symmetric and its int32 bias (scale s_in * s_w) does not overflow.
    dead = p.scale * (p.qmax - p.qmin) <= 1.0001e-8
    if np.any(dead):
      ok = p.scale[~dead] if p.scale.ndim else np.zeros(0)
      fill = np.float32(np.median(ok)) if ok.size else np.float32(1 / 127)
      p.scale = np.where(dead, fill, p.scale).astype(np.float32)
      p.zero_point = np.where(dead, 2 ** (p.bits - 1), p.zero_point).astype(np.float32)
      if scheme == "int8" and not p.scale.ndim:
        p.qmin = 1
  if p.kind == "weight" and scheme == "int8":
    symmetric = p.narrow and np.all(p.zero_point == 2 ** (p.bits - 1))
    if not symmetric:
      if asymmetric_weights == "symmetrize":
        t = np.maximum(np.abs(p.nudged_min), np.abs(p.nudged_max)).astype(np.float32)
        p.qmin, p.scale = 1, (t / (2 ** (p.bits - 1) - 1)).astype(np.float32)
        p.zero_point = np.full_like(p.scale, 2 ** (p.bits - 1))
      else:
        raise ExportError(f"tensor {p.name!r}: asymmetric weights (zero point {_int8_zp(p)}) cannot be represented "
                          "in the TFLite int8 scheme (weights need zero point 0); fine-tune with symmetric weights, "
                          "use scheme='uint8' for per-tensor weights, or pass asymmetric_weights='symmetrize'")


def _int8_zp(p: Point):
  zp = (p.zero_point - 2 ** (p.bits - 1)).astype(np.int64)
  return zp.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# jaxpr -> TensorFlow.


def _marker_name():
  from fatq.layers import quant_marker_p
  return quant_marker_p.name


class _Translator:
  """Evaluates a jaxpr with TensorFlow ops (inside a tf.function). Constants stay NumPy arrays and are folded."""

  def __init__(self, tf, points: dict[str, Point], scheme: str, asymmetric_weights: str):
    self.tf = tf
    self.points = points
    self.scheme, self.asymmetric_weights = scheme, asymmetric_weights
    self.qname: dict[int, str] = {}  # id(value) -> quantization point the value carries (through same-scale ops)
    self.layer: dict[int, dict] = {}  # id(conv/dense output before its bias) -> layer info
    self.prod: dict[int, dict] = {}  # id(value) -> info of the TFLite op that will compute it (through bias/relu)
    self.raw: dict[int, np.ndarray] = {}  # id(fake-quantized weight) -> its float array (to re-emit in another layout)
    self.layers: list[dict] = []  # conv / dense layers in program order
    self.ops: list[dict] = []  # elementwise ops between two tensors (residual ADD etc.) in program order

  # helpers -----------------------------------------------------------------------------------------------------------
  def is_const(self, v) -> bool:
    return isinstance(v, (np.ndarray, np.generic, int, float, bool))

  def tensor(self, v):
    return self.tf.constant(np.asarray(v)) if self.is_const(v) else v

  def full(self, v, aval):
    """Materialise an implicitly broadcast value to its jaxpr shape."""
    shape = tuple(aval.shape)
    if self.is_const(v):
      return np.broadcast_to(np.asarray(v), shape).astype(aval.dtype)
    if tuple(v.shape) != shape:
      return self.tf.broadcast_to(v, shape)
    return v

  def carry(self, src, dst):
    if id(src) in self.qname:
      self.qname[id(dst)] = self.qname[id(src)]
    return dst

  # evaluation --------------------------------------------------------------------------------------------------------
  def run(self, jaxpr, consts, args):
    from jax.extend.core import Literal
    env = {}

    def read(v):
      return np.asarray(v.val) if isinstance(v, Literal) else env[v]

    for var, c in zip(jaxpr.constvars, consts):
      env[var] = np.asarray(c)
    for var, a in zip(jaxpr.invars, args):
      env[var] = a
    eqns = list(jaxpr.eqns)
    skip = {}
    for i, eqn in enumerate(eqns):
      if i in skip:
        env[eqn.outvars[0]] = env[skip[i]]
        continue
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins, eqns, i, skip)
      if eqn.primitive.multiple_results:
        for var, o in zip(eqn.outvars, outs):
          env[var] = o
      else:
        env[eqn.outvars[0]] = outs
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins, eqns, i, skip):
    prim, params = eqn.primitive.name, eqn.params
    aval = eqn.outvars[0].aval if eqn.outvars else None
    # Sub-jaxprs (jit, custom_jvp/vjp: their primal computation).
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
      sub = params.get(key)
      if sub is not None and (hasattr(sub, "eqns") or hasattr(sub, "jaxpr")):
        jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
        if len(jaxpr.invars) != len(ins):
          raise ExportError(f"cannot export {prim!r}: its inner jaxpr takes {len(jaxpr.invars)} inputs, got {len(ins)}")
        outs = self.run(jaxpr, consts, ins)
        return outs if eqn.primitive.multiple_results else outs[0]
    if prim == _marker_name():
      return self.marker(ins[0], params["name"], params.get("channel_axis"))
    if all(self.is_const(x) for x in ins) and prim not in ("conv_general_dilated",):
      return self.fold(eqn, ins)
    handler = getattr(self, "p_" + prim, None)
    if handler is None:
      raise ExportError(f"cannot export primitive {prim!r} to TFLite (not in fatq.export's supported set: "
                        f"{sorted(n[2:] for n in dir(self) if n.startswith('p_'))})")
    return handler(eqn, ins, aval, eqns=eqns, i=i, skip=skip)

  def fold(self, eqn, ins):
    """Constant folding in NumPy via JAX's own implementation of the primitive."""
    outs = eqn.primitive.bind(*[jax.numpy.asarray(x) for x in ins], **eqn.params)
    if eqn.primitive.multiple_results:
      return [np.asarray(o) for o in outs]
    return np.asarray(outs)

  # quantization markers ----------------------------------------------------------------------------------------------
  def marker(self, x, name, channel_axis=None):
    tf = self.tf
    if channel_axis is not None and channel_axis != len(x.shape) - 1:
      raise ExportError(f"tensor {name!r}: per-channel ranges along axis {channel_axis} of a {len(x.shape)}-d tensor "
                        "cannot be represented: TFLite's per-channel axis is the output channels' (fatq's last axis); "
                        "use channel_axis=-1")
    if name not in self.points:
      raise ExportError(f"quantization point {name!r} has no range: calibrate the model first; a workbench "
                        "quantizer (kind 'pot', 'lsq' or 'fixed_point') has no TFLite form and cannot be exported")
    p = self.points[name]
    p.kind = "weight" if self.is_const(x) else "activation"
    _check_point(p, self.scheme, self.asymmetric_weights)
    if p.kind == "weight":
      w = np.asarray(x, np.float32)
      y = self.fq_weight(w, p)
      self.raw[id(y)] = w
    else:
      xt = self.tensor(x)
      if p.bits < 8 or p.narrow:
        # TFLite's kernels clamp only to the full 8-bit range (and a fused ReLU/ReLU6); the clamp of an n-bit range,
        # or of a narrow one (a symmetric signed activation, [-127, 127]), becomes MINIMUM / MAXIMUM ops (same scale)
        # in front of the carrier's quantization.
        xt = tf.minimum(xt, float(p.nudged_max))
        relu = getattr(x, "op", None) is not None and x.op.type in ("Relu", "Relu6")
        if not (relu and float(p.nudged_min) == 0.0):
          xt = tf.maximum(xt, float(p.nudged_min))
      y = tf.quantization.fake_quant_with_min_max_vars(xt, float(p.carrier_min), float(p.carrier_max),
                                                       num_bits=8, narrow_range=p.narrow)
      if id(x) in self.prod:
        self.prod[id(x)]["output"] = name
    self.qname[id(y)] = name
    return y

  def fq_weight(self, w, p):
    tf = self.tf
    # The fake-quant model's weights (on its own n-bit grid, correctly rounded division) go to TF, not the float
    # ones: TF's fake quant multiplies by 1 / scale and rounded a near-tie weight the other way (measured: 1 weight
    # of a MobileNet v1 layer). On the exported grid below they are then exact (n < 8 bits: stored as int8 codes of
    # the same scale, the converter rejects sub-8-bit tensors: an exact subset of the int8 grid).
    grid = QuantParams(p.model_scale, p.model_zero_point, p.model_qmin, p.qmax)
    w = np.asarray((quantize(w, grid) - p.model_zero_point) * p.model_scale, np.float32)
    if p.scale.ndim:
      return tf.quantization.fake_quant_with_min_max_vars_per_channel(
          tf.constant(w), p.carrier_min, p.carrier_max, num_bits=8, narrow_range=p.narrow)
    return tf.quantization.fake_quant_with_min_max_vars(tf.constant(w), float(p.carrier_min), float(p.carrier_max),
                                                        num_bits=8, narrow_range=p.narrow)

  def follow(self, src, dst):
    """``dst`` is computed by the same TFLite op as ``src`` (fused bias / activation)."""
    if id(src) in self.prod:
      self.prod[id(dst)] = self.prod[id(src)]
    return dst

  # structural ops (keep the quantization point of their input) -------------------------------------------------------
  def p_reshape(self, eqn, ins, aval, **_):
    x = self.full(ins[0], eqn.invars[0].aval)
    return self.carry(ins[0], self.tf.reshape(x, aval.shape))

  def p_squeeze(self, eqn, ins, aval, **_):
    return self.p_reshape(eqn, ins, aval)

  def p_expand_dims(self, eqn, ins, aval, **_):
    return self.p_reshape(eqn, ins, aval)

  def p_transpose(self, eqn, ins, aval, **_):
    return self.carry(ins[0], self.tf.transpose(self.full(ins[0], eqn.invars[0].aval), eqn.params["permutation"]))

  def p_broadcast_in_dim(self, eqn, ins, aval, **_):
    # Keep the operand's size: insert unit axes and let the consumer broadcast (bias vectors stay vectors).
    x, dims = ins[0], eqn.params["broadcast_dimensions"]
    shape = [1] * len(aval.shape)
    for d, n in zip(dims, np.shape(x)):
      shape[d] = n
    if self.is_const(x):
      return np.reshape(np.asarray(x), shape)
    return self.carry(x, self.tf.reshape(x, shape))

  def p_convert_element_type(self, eqn, ins, aval, **_):
    if np.dtype(aval.dtype) == np.float32:
      return ins[0]
    return self.tf.cast(ins[0], aval.dtype)

  def p_copy(self, eqn, ins, aval, **_):
    return ins[0]

  p_copy_p = p_copy

  def p_pad(self, eqn, ins, aval, **_):
    cfg = eqn.params["padding_config"]
    if any(c[2] for c in cfg) or any(c[0] < 0 or c[1] < 0 for c in cfg):
      raise ExportError("cannot export lax.pad with interior or negative padding to TFLite")
    value = np.asarray(ins[1]).item() if self.is_const(ins[1]) else None
    if value is None:
      raise ExportError("cannot export lax.pad with a non-constant padding value to TFLite")
    x = self.full(ins[0], eqn.invars[0].aval)
    return self.carry(ins[0], self.tf.pad(x, [(a, b) for a, b, _ in cfg], constant_values=value))

  def p_slice(self, eqn, ins, aval, **_):
    x = self.full(ins[0], eqn.invars[0].aval)
    strides = eqn.params["strides"] or [1] * len(aval.shape)
    return self.carry(ins[0], self.tf.strided_slice(x, eqn.params["start_indices"], eqn.params["limit_indices"],
                                                    strides))

  def p_concatenate(self, eqn, ins, aval, **_):
    xs = [self.tensor(self.full(x, v.aval)) for x, v in zip(ins, eqn.invars)]
    return self.tf.concat(xs, axis=eqn.params["dimension"])

  # elementwise --------------------------------------------------------------------------------------------------------
  def _binary(self, fn, eqn, ins):
    a, b = ins
    # Bias: conv/dense output + constant. Export a full per-output-channel vector (SPEC §3 pitfall).
    for x, c in ((a, b), (b, a)):
      if id(x) in self.layer and self.is_const(c) and eqn.primitive.name == "add":
        info = self.layer.pop(id(x))
        cout = int(x.shape[-1])
        c = np.asarray(c, np.float32)
        if c.size in (1, cout) and all(n == 1 for n in c.shape[:-1]):
          vec = np.broadcast_to(c.reshape(-1), (cout,)).astype(np.float32)
          info["bias"] = vec
          if info["kernel"] in self.points and info["input"] in self.points:
            # The converter gets the bias snapped to its int32 grid (codes x s_in s_w), so that it stores exactly the
            # codes of thresholds.json: it recomputes s_in s_w in its own precision, and a float bias within ~1e-5
            # codes of a tie then rounded the other way (measured: 1 channel of a MobileNet v1 depthwise layer).
            s = np.float64(self.points[info["input"]].scale) * self.points[info["kernel"]].scale.astype(np.float64)
            vec = (np.clip(np.round(vec / s), -(2**31 - 1), 2**31 - 1) * s).astype(np.float32)
          if cout > 1 and vec[0] != 0 and np.all(vec == vec[0]):
            # The converter stores an all-equal vector as a splat constant and then quantizes it with channel 0's
            # scale for every channel (SPEC §3 pitfall). One ulp on the last element keeps it a real vector; the
            # int32 codes are unchanged (the bias step s_in * s_w is ~2^20 ulps).
            vec = vec.copy()
            vec[-1] = np.nextafter(vec[-1], np.float32(np.inf))
          return self.follow(x, self.tf.nn.bias_add(x, self.tf.constant(vec)))
    y = fn(self.tensor(a), self.tensor(b))
    if not self.is_const(a) and not self.is_const(b) and eqn.primitive.name in ("add", "mul", "sub"):
      info = dict(op=eqn.primitive.name.upper(), inputs=[self.qname.get(id(a)), self.qname.get(id(b))])
      self.ops.append(info)
      self.prod[id(y)] = info
    return y

  def p_add(self, eqn, ins, aval, **_):
    return self._binary(self.tf.add, eqn, ins)

  def p_sub(self, eqn, ins, aval, **_):
    return self._binary(self.tf.subtract, eqn, ins)

  def p_mul(self, eqn, ins, aval, **_):
    return self._binary(self.tf.multiply, eqn, ins)

  def p_div(self, eqn, ins, aval, **_):
    return self._binary(self.tf.divide, eqn, ins)

  def p_max(self, eqn, ins, aval, **_):
    a, b = ins
    if self.is_const(b) and np.all(np.asarray(b) == 0):
      return self.follow(a, self.tf.nn.relu(self.tensor(a)))
    if self.is_const(a) and np.all(np.asarray(a) == 0):
      return self.follow(b, self.tf.nn.relu(self.tensor(b)))
    return self.tf.maximum(self.tensor(a), self.tensor(b))

  def p_min(self, eqn, ins, aval, **_):
    a, b = ins
    # relu6 = min(max(x, 0), 6)
    if self.is_const(b) and np.all(np.asarray(b) == 6) and getattr(a, "op", None) is not None and a.op.type == "Relu":
      return self.follow(a, self.tf.nn.relu6(a.op.inputs[0]))
    return self.tf.minimum(self.tensor(a), self.tensor(b))

  def p_clamp(self, eqn, ins, aval, **_):
    lo, x, hi = ins
    if self.is_const(lo) and self.is_const(hi) and np.all(np.asarray(lo) == 0) and np.all(np.asarray(hi) == 6):
      return self.follow(x, self.tf.nn.relu6(self.tensor(x)))
    return self.tf.clip_by_value(self.tensor(x), self.tensor(lo), self.tensor(hi))

  def p_neg(self, eqn, ins, aval, **_):
    return -self.tensor(ins[0])

  def p_tanh(self, eqn, ins, aval, **_):
    return self.tf.tanh(ins[0])

  def p_logistic(self, eqn, ins, aval, **_):
    return self.tf.sigmoid(ins[0])

  def p_exp(self, eqn, ins, aval, **_):
    return self.tf.exp(ins[0])

  def p_abs(self, eqn, ins, aval, **_):
    return self.tf.abs(ins[0])

  def p_sqrt(self, eqn, ins, aval, **_):
    return self.tf.sqrt(ins[0])

  def p_rsqrt(self, eqn, ins, aval, **_):
    return self.tf.math.rsqrt(ins[0])

  def p_integer_pow(self, eqn, ins, aval, **_):
    return self.tf.pow(ins[0], float(eqn.params["y"]))

  def p_square(self, eqn, ins, aval, **_):
    return self.tf.square(ins[0])

  # linear layers --------------------------------------------------------------------------------------------------------
  def p_conv_general_dilated(self, eqn, ins, aval, **_):
    tf = self.tf
    x, k = ins
    prm = eqn.params
    dn = prm["dimension_numbers"]
    if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
      raise ExportError(f"cannot export conv_general_dilated with dimension numbers {dn}: NHWC/HWIO/NHWC only")
    if any(d != 1 for d in prm["lhs_dilation"]) or prm["batch_group_count"] != 1:
      raise ExportError("cannot export a transposed (lhs-dilated) or batch-grouped convolution to TFLite")
    if self.is_const(x):
      raise ExportError("cannot export a convolution of a constant input")
    kq = self.qname.get(id(k))
    k = self.tensor(k)
    h, w = (int(d) for d in x.shape[1:3])
    kh, kw, cin_g, cout = (int(d) for d in k.shape)
    strides, dil = tuple(prm["window_strides"]), tuple(prm["rhs_dilation"])
    pads = [tuple(p) for p in prm["padding"]]
    ekh, ekw = (kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1
    same = [tuple(p) for p in jax.lax.padtype_to_pads((h, w), (ekh, ekw), strides, "SAME")]
    if pads == [(0, 0), (0, 0)]:
      padding = "VALID"
    elif pads == same:
      padding = "SAME"
    else:
      x = self.carry(x, tf.pad(x, [(0, 0), pads[0], pads[1], (0, 0)]))
      padding = "VALID"
    groups = prm["feature_group_count"]
    cin = int(x.shape[-1])
    xin = x
    if groups == 1:
      y = tf.nn.conv2d(x, k, (1, *strides, 1), padding, dilations=(1, *dil, 1))
      op = "CONV_2D"
    elif groups == cin and cin_g == 1:
      if strides[0] != strides[1]:
        raise ExportError("cannot export a depthwise convolution with unequal strides to TFLite")
      k = tf.reshape(k, (kh, kw, cin, cout // cin))
      y = tf.nn.depthwise_conv2d(x, k, (1, *strides, 1), padding, dilations=dil)
      op = "DEPTHWISE_CONV_2D"
    else:
      raise ExportError(f"cannot export a grouped convolution with {groups} groups of {cin} channels to TFLite "
                        "(regular and depthwise convolutions only)")
    info = dict(op=op, kernel=kq, input=self.qname.get(id(xin)), cout=cout)
    self.layers.append(info)
    self.layer[id(y)] = self.prod[id(y)] = info
    return y

  def p_dot_general(self, eqn, ins, aval, **_):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, b = ins
    if lb or rb or len(eqn.invars[0].aval.shape) != 2 or len(eqn.invars[1].aval.shape) != 2:
      raise ExportError(f"cannot export dot_general {eqn.params['dimension_numbers']}: 2-D matmul only")
    kq = self.qname.get(id(b))
    if tuple(lc) != (1,) or tuple(rc) != (0,) or self.is_const(a):
      raise ExportError(f"cannot export dot_general {eqn.params['dimension_numbers']}: x @ W with a constant W only")
    tf = self.tf
    if kq is not None and self.points[kq].scale.ndim:
      # Per-channel weights: TFLite's converter cannot move a per-axis quantized IO matrix into FULLY_CONNECTED's OI
      # layout ("tfl.transpose has mismatched quantized axes"), so x @ W becomes a 1x1 CONV_2D (same arithmetic).
      n, k = (int(d) for d in a.shape)
      w = self.fq_weight(self.raw[id(b)].reshape(1, 1, k, -1), self.points[kq])
      y = tf.nn.conv2d(tf.reshape(a, (n, 1, 1, k)), w, 1, "VALID")
      y = tf.reshape(y, (n, -1))
      op = "CONV_2D"
    else:
      y = tf.linalg.matmul(a, self.tensor(b))
      op = "FULLY_CONNECTED"
    info = dict(op=op, kernel=kq, input=self.qname.get(id(a)), cout=int(y.shape[-1]))
    self.layers.append(info)
    self.layer[id(y)] = self.prod[id(y)] = info
    return y

  # pooling and reductions --------------------------------------------------------------------------------------------
  def _window(self, eqn, x):
    p = eqn.params
    wd, ws = tuple(p["window_dimensions"]), tuple(p["window_strides"])
    if len(wd) != 4 or wd[0] != 1 or wd[3] != 1 or ws[0] != 1 or ws[3] != 1:
      raise ExportError(f"cannot export a {eqn.primitive.name} window {wd} / strides {ws}: NHWC spatial pooling only")
    if any(d != 1 for d in p["base_dilation"]) or any(d != 1 for d in p["window_dilation"]):
      raise ExportError(f"cannot export a dilated {eqn.primitive.name} to TFLite")
    pads = [tuple(q) for q in p["padding"]]
    h, w = (int(d) for d in x.shape[1:3])
    if all(q == (0, 0) for q in pads):
      return wd[1:3], ws[1:3], "VALID"
    same = [(0, 0)] + [tuple(q) for q in jax.lax.padtype_to_pads((h, w), wd[1:3], ws[1:3], "SAME")] + [(0, 0)]
    if pads == same:
      return wd[1:3], ws[1:3], "SAME"
    raise ExportError(f"cannot export {eqn.primitive.name} with explicit padding {pads}")

  def p_reduce_window_max(self, eqn, ins, aval, **_):
    win, st, pad = self._window(eqn, ins[0])
    return self.carry(ins[0], self.tf.nn.max_pool2d(ins[0], win, st, pad))

  def _consumer_divides(self, eqn, eqns, i, count):
    """Index of the next equation if it divides this one's result by ``count`` (a mean), else None."""
    out = eqn.outvars[0]
    for j in range(i + 1, len(eqns)):
      e = eqns[j]
      if out in e.invars:
        if e.primitive.name == "div" and e.invars[0] is out:
          from jax.extend.core import Literal
          d = e.invars[1]
          if isinstance(d, Literal) and np.all(np.asarray(d.val) == count):
            return j
        return None
    return None

  def p_reduce_window_sum(self, eqn, ins, aval, eqns, i, skip, **_):
    win, st, pad = self._window(eqn, ins[0])
    j = self._consumer_divides(eqn, eqns, i, int(np.prod(win)))
    if j is None or pad != "VALID":
      raise ExportError("cannot export a windowed sum that is not an average pool (sum / window size, VALID)")
    y = self.carry(ins[0], self.tf.nn.avg_pool2d(ins[0], win, st, pad))
    skip[j] = eqn.outvars[0]
    return y

  def p_reduce_sum(self, eqn, ins, aval, eqns, i, skip, **_):
    x = ins[0]
    axes = tuple(eqn.params["axes"])
    shape = eqn.invars[0].aval.shape
    count = int(np.prod([shape[a] for a in axes]))
    j = self._consumer_divides(eqn, eqns, i, count)
    if j is None:
      return self.tf.reduce_sum(x, axis=axes)
    skip[j] = eqn.outvars[0]
    if len(shape) == 4 and axes == (1, 2):
      y = self.carry(x, self.tf.nn.avg_pool2d(x, shape[1:3], 1, "VALID"))  # AVERAGE_POOL_2D keeps the input scale
      return self.carry(x, self.tf.reshape(y, aval.shape))
    return self.tf.reduce_mean(x, axis=axes)

  def p_reduce_max(self, eqn, ins, aval, **_):
    return self.carry(ins[0], self.tf.reduce_max(ins[0], axis=tuple(eqn.params["axes"])))


def set_biases(variables: Tree, biases: dict[str, np.ndarray]) -> Tree:
  """``variables`` with the parameters named ``<layer path>/bias`` replaced (float32), e.g. by the int32 biases of an
  export (``thresholds.json``: ``values_int32 * scale``)."""
  params = jax.tree.map(np.array, variables["params"])
  for name, value in biases.items():
    node = params
    *path, leaf = name.split("/")
    for k in path:
      node = node[k]
    node[leaf] = np.asarray(value, np.float64).astype(np.float32).reshape(np.shape(node[leaf]))
  return {**variables, "params": params}


def _trace(model, variables: Tree, sample: np.ndarray):
  with export_markers():
    return jax.make_jaxpr(lambda x: model.apply(variables, x))(sample)


# Ops that move a value without changing it: the result stays on its input's quantization grid.
_SAME_GRID = {"reshape", "squeeze", "expand_dims", "convert_element_type", "copy", "copy_p", "transpose",
              "broadcast_in_dim", "reduce_window_max", "slice", "pad"}


def global_pool_inputs(model, variables: Tree, sample: np.ndarray) -> list[str | None]:
  """For each global average pool (a mean over the spatial axes of an NHWC tensor) in the model, the quantization
  point whose grid its input is on (None when it has none), in program order."""
  found = []

  def walk(jaxpr, names):
    for eqn in jaxpr.eqns:
      prim = eqn.primitive.name
      ins = [names.get(v) if not hasattr(v, "val") else None for v in eqn.invars]
      for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None and (hasattr(sub, "eqns") or hasattr(sub, "jaxpr")):
          inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
          outs = walk(inner, dict(zip(inner.invars, ins)))
          names.update({o: n for o, n in zip(eqn.outvars, outs) if n})
          break
      else:
        if prim == _marker_name():
          names[eqn.outvars[0]] = eqn.params["name"]
        elif prim in _SAME_GRID and ins and ins[0]:
          names[eqn.outvars[0]] = ins[0]
        elif prim == "reduce_sum" and len(eqn.invars[0].aval.shape) == 4 and tuple(eqn.params["axes"]) == (1, 2):
          found.append(ins[0])
    return [names.get(v) for v in jaxpr.outvars]

  walk(_trace(model, variables, sample).jaxpr, {})
  return found


def tie_pool(model, variables: Tree, sample: np.ndarray, log=print):
  """``(model, variables, input point)`` with the global average pool's output quantized on its input's grid.

  TFLite's AVERAGE_POOL_2D keeps its input's scale and zero point, so the integer model rounds the pooled means to
  that grid; a fake-quant model that keeps the float mean differs by up to half a step per feature (measured: 3 output
  steps on MobileNet v1). This turns on the model's ``quantize_pool`` point ``pool`` and gives it the statistics and
  FAT factors of the pool's input point, so that both compute the same rounding. Returns the model unchanged (and
  None) when it has no ``quantize_pool`` field, already quantizes its pool, or its pool input is not quantized.
  """
  from fatq.layers import STATS, THRESHOLDS

  if getattr(model, "quantize_pool", True) or model.quant is None or STATS not in variables:
    return model, variables, None
  inputs = [n for n in global_pool_inputs(model, variables, sample) if n]
  if len(inputs) != 1 or model.quant.spec_for("pool") != model.quant.spec_for(inputs[0]):
    return model, variables, None
  src = inputs[0].split("/")
  src[-1] += "_quant"

  def with_pool(tree):
    node = tree
    for k in src:
      if k not in node:
        return tree
      node = node[k]
    return {**tree, "pool_quant": jax.tree.map(np.asarray, node)}

  tied = model.clone(quantize_pool=True)
  new = {**variables, STATS: with_pool(variables[STATS])}
  if THRESHOLDS in variables:
    new[THRESHOLDS] = with_pool(variables[THRESHOLDS])
  r = quant_ranges(tied, new, sample)
  a, b = r["pool"], r[inputs[0]]
  if not (np.array_equal(a["scale"], b["scale"]) and np.array_equal(a["zero_point"], b["zero_point"])):
    raise ExportError(f"the pool quantizer did not get the grid of {inputs[0]!r}")
  log(f"global average pool: quantized on the grid of {inputs[0]!r} (as TFLite's AVERAGE_POOL_2D computes it)")
  return tied, new, inputs[0]


# ---------------------------------------------------------------------------------------------------------------------
# Public API.


class Exported:
  """The translated TF function plus everything needed for thresholds.json and conversion."""

  def __init__(self, model, variables: Tree, sample_images: np.ndarray, scheme: str = "int8",
               asymmetric_weights: str = "refuse", allow_float: bool = False):
    import tensorflow as tf

    if asymmetric_weights not in ("refuse", "symmetrize"):
      raise ExportError(f"asymmetric_weights must be 'refuse' or 'symmetrize', got {asymmetric_weights!r}")
    bounded = sorted(name.rpartition("/")[0] for name in flax.traverse_util.flatten_dict(
        flax.core.unfreeze(variables.get("params", {})), sep="/") if name.endswith("/" + RELU6_BOUND))
    if bounded:
      more = f" (and {len(bounded) - 1} more)" if len(bounded) > 1 else ""
      raise ExportError(f"layer {bounded[0]!r}{more} ends in a ReLU6 with a bound per "
                        "channel (cross-layer equalization, equalize=True), which TFLite's fused ReLU6 (6 for every "
                        "channel) cannot represent: fine-tune the row with equalize='relu' (ReLU6 -> ReLU before "
                        "equalizing) to export it")
    sample = np.asarray(sample_images[:1], np.float32)
    variables = fold_biases(model, variables, sample)
    self.model, self.sample = model, sample
    self.input_shape = sample.shape
    self.scheme = scheme
    ranges = quant_ranges(model, variables, sample) if "quant_stats" in variables else {}
    if not ranges and not allow_float:
      raise ExportError("the model has no calibrated quantization points: calibrate (and fine-tune) it first; a "
                        "float model cannot be exported as a full-integer TFLite model by fatq.export")
    self.points = _points(ranges, set())
    closed = _trace(model, variables, sample)
    self.closed = closed
    self.tf = tf
    self.translator = None
    self.output_point = None

    def fn(x):
      t = _Translator(tf, self.points, scheme, asymmetric_weights)
      out = t.run(closed.jaxpr, closed.consts, [x])
      self.translator = t
      self.output_point = t.qname.get(id(out[0]))
      if len(out) != 1:
        raise ExportError(f"the model returns {len(out)} outputs; fatq.export handles one")
      return tf.identity(out[0], name="logits")

    self.function = tf.function(fn, autograph=False, input_signature=[tf.TensorSpec(sample.shape, tf.float32, name="input")])
    self.concrete = self.function.get_concrete_function()
    self.adjusted = self._fit_weight_scales()
    if self.adjusted:  # trace again with the raised scales
      self.function = tf.function(fn, autograph=False,
                                  input_signature=[tf.TensorSpec(sample.shape, tf.float32, name="input")])
      self.concrete = self.function.get_concrete_function()
    unused = set(self.points) - {n for n, p in self.points.items() if p.kind in ("weight", "activation")}
    self.points = {n: p for n, p in self.points.items() if n not in unused}

  def _fit_weight_scales(self) -> dict[str, dict]:
    """Raise the weight scales that TFLite cannot use as they are; returns {weight point: what changed}.

    Two cases, both in (near-)dead channels whose weights are ~1e-6 or smaller (measured: 5 channels of the
    fine-tuned MobileNet v1, each followed by ReLU6 with a negative bias): the converter floors a channel's range at
    1e-6 (its scale then differs from thresholds.json), and a tiny ``s_in * s_w`` makes the int32 bias code huge: the
    converter clips it at 2^31 - 1 and the accumulator then overflows (TFLite gave such channels positive outputs).
    Such a scale becomes the smallest that avoids both (bias codes within 2^30); the channel's weights are then
    quantized on that coarser grid, which changes its output by at most half its (tiny) weights' sum times the input.
    """
    changed = {}
    for layer in self.translator.layers:
      if layer["kernel"] is None or layer["kernel"] not in self.points:
        continue
      w = self.points[layer["kernel"]]
      need = np.full(w.scale.shape, _MIN_WEIGHT_RANGE / (w.qmax - w.qmin))
      if "bias" in layer and layer["input"] in self.points:
        s_in = float(self.points[layer["input"]].scale)
        fit = np.abs(np.asarray(layer["bias"], np.float64)) / (s_in * _BIAS_LIMIT)
        need = np.maximum(need, fit if w.scale.ndim else fit.max())
      low = w.scale < need
      if np.any(low):
        new = np.where(low, need * (1 + 1e-3), w.scale).astype(np.float32)
        changed[w.name] = dict(channels=np.flatnonzero(np.atleast_1d(low)).tolist(),
                               scale=np.atleast_1d(w.scale)[np.atleast_1d(low)].tolist(),
                               new_scale=np.atleast_1d(new)[np.atleast_1d(low)].tolist())
        w.scale = new
    return changed

  def grids(self) -> dict[str, QuantParams]:
    """``{point name: QuantParams}``: every quantization point's grid as model.tflite stores it (scale, zero point on
    the unsigned grid ``[qmin, qmax]``), for :func:`fatq.layers.integer_arithmetic`."""
    return {n: QuantParams(p.scale, p.zero_point, p.qmin, p.qmax) for n, p in self.points.items()}

  def biases(self):
    """``(layer, name, scale, int32 codes)`` of every layer bias: scale ``s_in * s_w`` per output channel (float64),
    codes ``round(b / scale)`` (what the converter stores)."""
    out = []
    for layer in self.translator.layers:
      if "bias" not in layer or layer["kernel"] is None or layer["input"] is None:
        continue
      w, x = self.points[layer["kernel"]], self.points[layer["input"]]
      s = (np.float64(x.scale) * w.scale.astype(np.float64)) * np.ones(layer["cout"])
      codes = np.clip(np.round(layer["bias"] / s), -(2**31 - 1), 2**31 - 1).astype(np.int64)
      out.append((layer, layer["kernel"].rsplit("/", 1)[0] + "/bias", s, codes))
    return out

  def snap_biases(self, variables: Tree) -> Tree:
    """``variables`` with every exported bias replaced by its int32 value (codes x scale), i.e. what the TFLite model
    adds. The JAX fake-quant model keeps float biases; the difference is up to half a bias step ``s_in * s_w``, which
    for layers with large weights is a sizeable part of an output step (measured on MobileNet v1: 0.16 of a step, a
    constant one-code offset of a whole channel). The converter maps the snapped biases to the same codes."""
    # folded first: learned bias offsets and tracked corrections would be added to the int32 biases a second time
    return set_biases(fold_biases(self.model, variables, self.sample),
                      {name: codes * s for _, name, s, codes in self.biases()})

  # thresholds ---------------------------------------------------------------------------------------------------------
  def thresholds(self) -> dict:
    entries = []
    uint8 = self.scheme == "uint8"
    shift = 0 if uint8 else 128
    dtype = "uint8" if uint8 else "int8"
    layers = {l["kernel"]: l for l in self.translator.layers if l["kernel"]}
    for name, p in self.points.items():
      # codes: the stored integers this point's grid uses (all of int8/uint8 at 8 bits, a sub-range below)
      e = dict(name=name, kind=p.kind, dtype=dtype, bits=p.bits, min=p.nudged_min.tolist(),
               max=p.nudged_max.tolist(), scale=p.scale.tolist(),
               zero_point=(p.zero_point + p.offset - shift).astype(np.int64).tolist(), quantized_axis=None,
               narrow_range=p.narrow, codes=[p.qmin + p.offset - shift, p.qmax + p.offset - shift])
      if p.kind == "weight":
        layer = layers.get(name)
        e["op"] = layer["op"] if layer else None
        if name in self.adjusted:
          e["adjusted"] = self.adjusted[name]
        if p.scale.ndim:
          # TFLite layouts: CONV_2D OHWI (axis 0), DEPTHWISE_CONV_2D 1HWC (axis 3), FULLY_CONNECTED OI (axis 0).
          e["quantized_axis"] = 3 if layer and layer["op"] == "DEPTHWISE_CONV_2D" else 0
      entries.append(e)
    for layer, name, s, codes in self.biases():
      per_channel = bool(self.points[layer["kernel"]].scale.ndim)
      entries.append(dict(name=name, kind="bias", dtype="int32", bits=32,
                          scale=s.astype(np.float32).tolist() if per_channel else float(np.float32(s[0])),
                          zero_point=[0] * layer["cout"] if per_channel else 0,
                          quantized_axis=0 if per_channel else None,
                          input=layer["input"], weight=layer["kernel"], op=layer["op"],
                          min=(s * -(2**31 - 1)).tolist(), max=(s * (2**31 - 1)).tolist(),
                          values_int32=codes.tolist()))
    layers = [dict(op=l["op"], input=l["input"], kernel=l["kernel"], output=l.get("output"),
                   bias=(l["kernel"].rsplit("/", 1)[0] + "/bias") if "bias" in l and l["kernel"] else None)
              for l in self.translator.layers]
    ops = [dict(op=o["op"], inputs=o["inputs"], output=o.get("output")) for o in self.translator.ops]
    return dict(scheme=self.scheme, input_shape=list(self.input_shape), output=self.output_point, tensors=entries,
                layers=layers, ops=ops)

  # conversion ---------------------------------------------------------------------------------------------------------
  def convert(self, input_type: str = "int8", output_type: str = "int8") -> bytes:
    tf = self.tf
    for t in (input_type, output_type):
      if t not in IO_TYPES:
        raise ExportError(f"unknown input/output type {t!r}; choose one of {IO_TYPES}")
    conv = tf.lite.TFLiteConverter.from_concrete_functions([self.concrete], self.function)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.inference_input_type = getattr(tf, input_type)
    conv.inference_output_type = getattr(tf, output_type)
    blob = conv.convert()
    _check_integer_only(blob)
    return blob


def _check_integer_only(blob: bytes) -> None:
  """Raise where the converter kept an op in float (it falls back silently for ops without integer kernels, e.g.
  SQUARE, POW, DIV): the file would not be the full-integer model it claims to be. Float tensors are allowed only as
  the model's own input and output (``input_type`` / ``output_type`` float32)."""
  from ai_edge_litert.interpreter import Interpreter

  interp = Interpreter(model_content=blob)
  io = {d["index"] for d in interp.get_input_details() + interp.get_output_details()}
  floats = {d["index"] for d in interp.get_tensor_details() if d["dtype"] == np.float32 and d["index"] not in io}
  ops = sorted({o["op_name"] for o in interp._get_ops_details()
                if floats & (set(o["inputs"]) | set(o["outputs"])) and o["op_name"] not in ("QUANTIZE", "DEQUANTIZE")})
  if floats:
    raise ExportError(f"the converter kept {len(floats)} tensor(s) in float32 (ops {', '.join(ops) or 'none'}): "
                      "TFLite has no integer kernel for them, so the file would not be full-integer. Replace those "
                      "operations in the model, or export the float model")


def float_function(model, params: Tree, sample_images: np.ndarray) -> "Exported":
  """The float model (no quantization points) translated to TensorFlow, for float and post-training baselines."""
  return Exported(model, {"params": params}, sample_images, allow_float=True)


def convert_float(ex: "Exported") -> bytes:
  """A float32 .tflite of a translated float model."""
  return ex.tf.lite.TFLiteConverter.from_concrete_functions([ex.concrete], ex.function).convert()


def convert_ptq(ex: "Exported", representative_images: np.ndarray, input_type: str = "int8",
                output_type: str = "int8") -> bytes:
  """TensorFlow Lite's own post-training full-integer quantization of a translated float model (the peer baseline):
  ranges from ``representative_images`` (the same calibration images fatq uses), int8 per-channel weights."""
  tf = ex.tf
  conv = tf.lite.TFLiteConverter.from_concrete_functions([ex.concrete], ex.function)
  conv.optimizations = [tf.lite.Optimize.DEFAULT]
  shape = ex.input_shape

  def rep():
    for x in representative_images:
      yield [np.asarray(x, np.float32).reshape(shape)]

  conv.representative_dataset = rep
  conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  conv.inference_input_type = getattr(tf, input_type)
  conv.inference_output_type = getattr(tf, output_type)
  return conv.convert()


def thresholds_json(model, variables: Tree, sample_images: np.ndarray, scheme: str = "int8",
                    asymmetric_weights: str = "refuse") -> dict:
  """Every quantized tensor in TFLite terms (see the module docstring) as a JSON-ready dict."""
  return Exported(model, variables, sample_images, scheme, asymmetric_weights).thresholds()


def _write(path: Path, data: bytes | str) -> None:
  """``data`` into ``path`` whole or not at all (a .tflite file someone may ship); a failed write (a full disk, no
  permission) is an :class:`ExportError`."""
  try:
    (write_bytes if isinstance(data, bytes) else write_text)(path, data)
  except OSError as e:
    raise ExportError(f"cannot write {path}: {e.strerror or e}; no partial file is left (an earlier export's file "
                      "there keeps its contents): free space or choose another --out") from e


def _make_out_dir(out: Path) -> None:
  """``out`` created, without the report of an earlier export in it (which would describe another file)."""
  if out.exists() and not out.is_dir():
    raise ExportError(f"output folder {out} is a file: choose another --out")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ExportError(f"cannot create the output folder {out}: {e.strerror or e}; choose another --out") from None
  (out / "export_report.json").unlink(missing_ok=True)


def export_tflite(model, variables: Tree, sample_images: np.ndarray, out_dir: str | os.PathLike,
                  scheme: str = "int8", input_type: str = "int8", output_type: str = "int8",
                  asymmetric_weights: str = "refuse", log=print, exported: "Exported | None" = None) -> dict:
  """Write ``out_dir/model.tflite`` and ``out_dir/thresholds.json`` (plus thresholds_<other scheme>.json when the
  model can be expressed in it). ``variables`` = {'params', 'quant_stats', 'quant'}; ``exported``: the
  :class:`Exported` of these arguments when the caller has built it already. Returns a small report."""
  out = Path(out_dir)
  t0 = time.time()
  ex = exported or Exported(model, variables, sample_images, scheme, asymmetric_weights)
  blob = ex.convert(input_type, output_type)  # a refused model leaves no folder and no file behind
  _make_out_dir(out)
  _write(out / "model.tflite", blob)
  th = ex.thresholds()
  th.update(input_type=input_type, output_type=output_type)
  _write(out / "thresholds.json", json.dumps(th, indent=1))
  report = dict(model_tflite=str(out / "model.tflite"), thresholds=str(out / "thresholds.json"), scheme=scheme,
                bytes=len(blob), tensors=len(th["tensors"]), seconds=round(time.time() - t0, 2),
                adjusted_weight_scales=ex.adjusted)
  for other in SCHEMES:
    if other == scheme:
      continue
    try:
      other_th = thresholds_json(model, variables, sample_images, other, asymmetric_weights)
    except ExportError as e:
      report[f"thresholds_{other}"] = f"not representable: {e}"
      continue
    _write(out / f"thresholds_{other}.json", json.dumps(other_th, indent=1))
    report[f"thresholds_{other}"] = str(out / f"thresholds_{other}.json")
  log(f"exported {report}")
  return report


def read_tflite_quant_params(path_or_bytes) -> list[dict]:
  """Every tensor of a .tflite file with its quantization: name, dtype, shape, scales, zero points, axis."""
  from ai_edge_litert.interpreter import Interpreter

  kw = dict(model_content=path_or_bytes) if isinstance(path_or_bytes, bytes) else dict(model_path=str(path_or_bytes))
  interp = Interpreter(**kw)
  out = []
  for d in interp.get_tensor_details():
    q = d["quantization_parameters"]
    out.append(dict(index=d["index"], name=d["name"], dtype=np.dtype(d["dtype"]).name, shape=list(d["shape"]),
                    scale=np.asarray(q["scales"]).tolist(), zero_point=np.asarray(q["zero_points"]).tolist(),
                    quantized_axis=int(q["quantized_dimension"])))
  return out


def match_tflite(model: str | os.PathLike | bytes, thresholds: dict) -> dict[str, dict]:
  """{thresholds.json tensor name: the .tflite tensor that holds it} (from :func:`read_tflite_quant_params`).

  TFLite fuses ops and renames tensors, so tensors are found by structure: the k-th CONV_2D / DEPTHWISE_CONV_2D /
  FULLY_CONNECTED op is the k-th exported layer (inputs: activation, weight, bias; output: its output activation),
  the k-th ADD / MUL / SUB between two tensors is the k-th such exported op.
  """
  from ai_edge_litert.interpreter import Interpreter

  kw = dict(model_content=model) if isinstance(model, bytes) else dict(model_path=str(model))
  interp = Interpreter(**kw)
  tensors = {t["index"]: t for t in read_tflite_quant_params(model)}
  ops = interp._get_ops_details()
  found: dict[str, dict] = {}

  def put(name, index):
    if name is None or index < 0:
      return
    t = tensors[index]
    if name in found and found[name]["index"] != index:
      # the same fatq point can feed several ops (e.g. a pooled or reshaped copy); keep the first, check agreement
      return
    found[name] = t

  for kinds, wanted, in_keys in (({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}, thresholds["layers"],
                                  ("input", "kernel", "bias")),
                                 ({"ADD", "MUL", "SUB"}, thresholds.get("ops", []), None)):
    got = [o for o in ops if o["op_name"] in kinds]
    if len(got) != len(wanted):
      raise ExportError(f"the .tflite model has {len(got)} {sorted(kinds)} ops, the export recorded {len(wanted)}")
    for o, w in zip(got, wanted):
      if in_keys:
        for key, index in zip(in_keys, o["inputs"]):
          put(w[key], int(index))
      else:
        for name, index in zip(w["inputs"], o["inputs"]):
          put(name, int(index))
      put(w["output"], int(o["outputs"][0]))
  return found


class TFLiteModel:
  """The ai-edge-litert interpreter on a .tflite model, batch 1: float images in, float logits out.

  ``kernels``: 'xnnpack' (the interpreter's default: the XNNPACK delegate), 'builtin' (TFLite's optimized builtin
  kernels) or 'reference' (its reference kernels, which :class:`fatq.integer.IntegerModel` reproduces exactly).
  The three do not compute the same integers (docs/export.md). ``output``: a tensor (index or name) to stop at
  instead of the model's output (:func:`fatq.integer.cut_model`), e.g. the logits before a SOFTMAX."""

  KERNELS = ("xnnpack", "builtin", "reference")

  def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None, kernels: str = "xnnpack",
               output: int | str | None = None):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if kernels not in self.KERNELS:
      raise ValueError(f"kernels={kernels!r}: choose one of {self.KERNELS}")
    if output is not None:
      model = cut_model(model if isinstance(model, bytes) else Path(model).read_bytes(), output)
    kw = dict(model_content=model) if isinstance(model, bytes) else dict(model_path=str(model))
    if kernels != "xnnpack":
      kw["experimental_op_resolver_type"] = (OpResolverType.BUILTIN_REF if kernels == "reference"
                                             else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    self.kernels = kernels
    self.interp = Interpreter(**kw, num_threads=num_threads)
    self.interp.allocate_tensors()
    self.inp = self.interp.get_input_details()[0]
    self.out = self.interp.get_output_details()[0]

  def quantize_input(self, x: np.ndarray) -> np.ndarray:
    dt = self.inp["dtype"]
    if dt == np.float32:
      return x.astype(np.float32)
    scale, zp = self.inp["quantization"]
    return input_codes(x, scale, zp, dt)

  def raw(self, x1: np.ndarray) -> np.ndarray:
    """One image (shape of the model input), already in the input dtype; returns the raw output."""
    self.interp.set_tensor(self.inp["index"], x1)
    self.interp.invoke()
    return self.interp.get_tensor(self.out["index"]).copy()

  def dequantize_output(self, y: np.ndarray) -> np.ndarray:
    if self.out["dtype"] == np.float32:
      return y.astype(np.float32)
    scale, zp = self.out["quantization"]
    return output_values(y, scale, zp)

  @property
  def output_step(self) -> float:
    return float(self.out["quantization"][0]) if self.out["dtype"] != np.float32 else 0.0

  def __call__(self, images: np.ndarray) -> np.ndarray:
    shape = tuple(self.inp["shape"])
    outs = [self.dequantize_output(self.raw(self.quantize_input(x.reshape(shape)))) for x in images]
    return np.concatenate(outs, axis=0)

  def latency_ms(self, image: np.ndarray, runs: int = 20, warmup: int = 3) -> float:
    x = self.quantize_input(image.reshape(tuple(self.inp["shape"])))
    for _ in range(warmup):
      self.raw(x)
    t = []
    for _ in range(runs):
      t0 = time.perf_counter()
      self.raw(x)
      t.append(time.perf_counter() - t0)
    return float(np.median(t) * 1e3)


# ---------------------------------------------------------------------------------------------------------------------
# Checks and the export report.


def check_readback(model: str | os.PathLike | bytes, thresholds: dict) -> dict:
  """Every thresholds.json tensor read back from the .tflite file: scale and zero point equal?

  Scales are compared in relative terms (the converter recomputes them from min/max in float32: a few ulps), zero
  points exactly. For the uint8 scheme the file's tensors are int8 (SPEC §3): its zero points are compared with the
  uint8 ones minus 128. Returns counts and the mismatches (empty when all agree)."""
  found = match_tflite(model, thresholds)
  shift = 128 if thresholds["scheme"] == "uint8" else 0
  bad, worst = [], 0.0
  for t in thresholds["tensors"]:
    got = found.get(t["name"])
    if got is None:
      bad.append(dict(name=t["name"], problem="not found in the .tflite model"))
      continue
    want_scale = np.atleast_1d(np.asarray(t["scale"], np.float64))
    want_zp = np.atleast_1d(t["zero_point"]) - (shift if t["kind"] != "bias" else 0)
    scale = np.asarray(got["scale"], np.float64)
    rel = float(np.max(np.abs(scale - want_scale) / want_scale)) if scale.shape == want_scale.shape else np.inf
    worst = max(worst, rel)
    if rel > 4e-6 or not np.array_equal(np.asarray(got["zero_point"]), want_zp):
      bad.append(dict(name=t["name"], problem="scale / zero point differ", want_scale=want_scale[:4].tolist(),
                      got_scale=scale[:4].tolist(), want_zero_point=want_zp[:4].tolist(),
                      got_zero_point=list(got["zero_point"][:4])))
  return dict(tensors=len(thresholds["tensors"]), matched=len(thresholds["tensors"]) - len(bad),
              max_scale_rel_diff=worst, mismatches=bad)


def predict(model, variables: Tree, images: np.ndarray, batch_size: int = 50, arithmetic: str = "float",
            float_layers: list | None = None, grids: dict | None = None, scheme: str = "int8") -> np.ndarray:
  """JAX logits in batches (the last batch padded: one compiled shape).

  ``arithmetic='integer'`` evaluates the quantized model in the integer arithmetic of its TFLite export
  (:func:`fatq.layers.integer_arithmetic`); the names of layers that could not be computed so are appended to
  ``float_layers``; ``grids``: the export's grids (:meth:`Exported.grids`), ``scheme`` its stored codes.
  ``'float'``: the float arithmetic of training."""
  if arithmetic not in ("float", "integer"):
    raise ValueError(f"arithmetic must be 'float' or 'integer', got {arithmetic!r}")
  with (integer_arithmetic(grids, scheme) if arithmetic == "integer" else contextlib.nullcontext()) as layers:
    fwd = jax.jit(lambda v, x: model.apply(v, x))
    out = []
    for i in range(0, len(images), batch_size):
      x = images[i:i + batch_size]
      n = len(x)
      if n < batch_size and i:
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
      out.append(np.asarray(fwd(variables, x))[:n])
  if layers is not None and float_layers is not None:
    float_layers.extend(sorted(set(layers.float) - set(float_layers)))
  return np.concatenate(out)


TARGETS = dict(agreement=0.995, max_logit_diff_steps=2.0, top1_diff_points=0.2)


def compare_logits(jax_logits: np.ndarray, lite_logits: np.ndarray, labels: np.ndarray, step: float,
                   label_offset: int = 0) -> dict:
  """Interpreter vs JAX fake-quant: top-1 of each, top-1 agreement, max logit difference in output steps."""
  pj, pl = jax_logits.argmax(1), lite_logits.argmax(1)
  srt = np.sort(jax_logits, axis=1)
  tied = srt[:, -1] == srt[:, -2]  # quantized logits: equal top-2 codes, argmax decided by index order
  rows = np.arange(len(pj))
  # either model's top-1 is also a maximum of the other's logits (ties broken either way)
  tie_aware = (jax_logits[rows, pl] == srt[:, -1]) | (lite_logits[rows, pj] == lite_logits.max(1))
  m = dict(images=len(labels), top1_jax=float(np.mean(pj == labels + label_offset)),
           top1_tflite=float(np.mean(pl == labels + label_offset)), agreement=float(np.mean(pj == pl)),
           max_logit_diff_steps=float(np.max(np.abs(jax_logits - lite_logits)) / step),
           mean_logit_diff_steps=float(np.mean(np.abs(jax_logits - lite_logits)) / step),
           logits_equal=float(np.mean(np.all(np.abs(jax_logits - lite_logits) < 0.5 * step, axis=1))),
           jax_top2_tied=float(np.mean(tied)),
           agreement_untied=float(np.mean((pj == pl)[~tied])) if np.any(~tied) else None,
           agreement_tie_aware=float(np.mean(tie_aware)),
           logit_diff_histogram={str(k): int(v) for k, v in zip(*np.unique(
               np.round(np.abs(jax_logits - lite_logits) / step).astype(int), return_counts=True))})
  m["top1_diff_points"] = 100 * (m["top1_tflite"] - m["top1_jax"])
  m["pass"] = dict(agreement=m["agreement"] >= TARGETS["agreement"],
                   # float32 logits: a whole number of steps comes out a few ulps above it
                   max_logit_diff_steps=m["max_logit_diff_steps"] <= TARGETS["max_logit_diff_steps"] + 1e-3,
                   top1_diff_points=abs(m["top1_diff_points"]) <= TARGETS["top1_diff_points"] + 1e-9)
  return m


def export_and_check(qmodel, variables: Tree, float_model, float_params: Tree, images: np.ndarray,
                     labels: np.ndarray, out_dir: str | os.PathLike, *, label_offset: int = 0, scheme: str = "int8",
                     input_type: str | None = None, output_type: str | None = None,
                     asymmetric_weights: str = "refuse", tie_pool_grid: bool = True, snap_biases: bool = True,
                     eval_model=None, integer_check: bool = True, reference_images: int = 200,
                     threads=(1, 2), latency_runs: int = 50, float_blob: bytes | None = None, log=print) -> dict:
  """Export ``qmodel`` (convolutions in the ``impl='lax'`` form) with :func:`export_tflite`, then check the file:

  * every thresholds.json tensor's scale / zero point read back from model.tflite (:func:`check_readback`);
  * interpreter vs JAX fake-quant on ``images``: top-1 of each, agreement, max logit difference in output steps;
  * interpreter latency (median single-image invoke) at each of ``threads`` and file size, beside the float model's
    (``float_model`` with ``float_params``, converted without quantization; written as float.tflite).

  ``tie_pool_grid``: quantize the global average pool's output on its input's grid first (:func:`tie_pool`), in the
  exported model and in the JAX model it is compared with. ``snap_biases``: give the JAX model the int32 biases of
  the TFLite model (:meth:`Exported.snap_biases`); the JAX top-1 of the model as fine-tuned (float pool, float
  biases) is reported beside it. ``eval_model``: the module used for the JAX logits (e.g.
  the same model with ``impl='fast'``); it gets the same quantization configuration. input/output types default to
  the scheme's dtype. ``integer_check``: also evaluate the file with :class:`fatq.integer.IntegerModel` (the interpreter's
  integer arithmetic in JAX): XNNPACK's on ``images``, against the interpreter and the JAX fake-quant model; the
  reference kernels' on the first ``reference_images``, against the interpreter's reference kernels (slow: ~0.2 s
  per MobileNet image).
  Writes out_dir/export_report.json and returns the report.
  """
  out = Path(out_dir)
  input_type, output_type = input_type or scheme, output_type or scheme
  sample = np.asarray(images[:1], np.float32)
  variables = fold_biases(qmodel, variables, sample)  # the biases TFLite gets, and snap_biases replaces
  pool_src, untied = None, (qmodel, variables)
  if tie_pool_grid:
    qmodel, variables, pool_src = tie_pool(qmodel, variables, sample, log=log)
  report = dict(scheme=scheme, input_type=input_type, output_type=output_type, asymmetric_weights=asymmetric_weights,
                pool_quantized_on=pool_src, int32_biases_in_jax=snap_biases)
  ex = Exported(qmodel, variables, sample, scheme, asymmetric_weights)
  if snap_biases:
    variables = ex.snap_biases(variables)
  report["export"] = export_tflite(qmodel, variables, sample, out, scheme, input_type, output_type,
                                   asymmetric_weights, log=lambda *_: None, exported=ex)
  th = json.loads((out / "thresholds.json").read_text())
  report["bits"] = sorted({t["bits"] for t in th["tensors"] if t["kind"] != "bias"})
  report["readback"] = rb = check_readback(out / "model.tflite", th)
  log(f"read back: {rb['matched']}/{rb['tensors']} tensors of thresholds.json have the same scale and zero point "
      f"in model.tflite (max scale rel. diff {rb['max_scale_rel_diff']:.1e})")
  for m in rb["mismatches"][:10]:
    log(f"  MISMATCH {m}")

  # interpreter vs JAX
  t0 = time.time()
  lite = TFLiteModel(out / "model.tflite", num_threads=max(threads))
  lite_logits = lite(images)
  t_lite = time.time() - t0
  step = float(np.asarray({t["name"]: t for t in th["tensors"]}[th["output"]]["scale"]))
  em = (eval_model or qmodel).clone(quant=qmodel.quant)
  if hasattr(qmodel, "quantize_pool"):
    em = em.clone(quantize_pool=qmodel.quantize_pool)
  t0 = time.time()
  float_layers = []
  # the converter stores int8 codes inside the model in both schemes (uint8 only at its input / output): int8 rounding
  jax_logits = predict(em, variables, images, arithmetic="integer", float_layers=float_layers, grids=ex.grids())
  t_jax = time.time() - t0
  jax_float_logits = predict(em, variables, images)
  np.savez_compressed(out / "logits.npz", jax=jax_logits, jax_float_arithmetic=jax_float_logits, tflite=lite_logits,
                      labels=labels)
  report["eval"] = compare_logits(jax_logits, lite_logits, labels, step, label_offset)
  report["eval"].update(arithmetic="integer", layers_in_float=float_layers, output_step=step,
                        seconds_tflite=round(t_lite, 1), seconds_jax=round(t_jax, 1))
  report["eval_float_arithmetic"] = compare_logits(jax_float_logits, lite_logits, labels, step, label_offset)
  if integer_check:
    try:
      report["integer"] = _integer_check(out / "model.tflite", images, labels, jax_logits, lite_logits, step,
                                         label_offset, reference_images)
    except UnsupportedOpError as err:  # the file itself is fine; only the JAX integer evaluation cannot run
      report["integer"] = dict(error=str(err))
  if pool_src is not None or snap_biases:  # the model as fine-tuned (float pooled features and biases), for reference
    m0, v0 = untied
    e0 = (eval_model or m0).clone(quant=m0.quant)
    report["eval"]["top1_jax_as_finetuned"] = float(np.mean(predict(e0, v0, images).argmax(1) == labels + label_offset))

  # size and latency beside the float model
  if float_blob is None:
    float_blob = convert_float(float_function(float_model, float_params, sample))
  _write(out / "float.tflite", float_blob)
  blob = (out / "model.tflite").read_bytes()
  report["size_bytes"] = dict(tflite=len(blob), float_tflite=len(float_blob))
  report["latency_ms"] = {}
  for name, b in (("tflite", blob), ("float_tflite", float_blob)):
    for n in threads:
      report["latency_ms"][f"{name}_{n}t"] = round(TFLiteModel(b, num_threads=n).latency_ms(images[0],
                                                                                              runs=latency_runs), 3)
  report["files"] = dict(model=str(out / "model.tflite"), float_model=str(out / "float.tflite"),
                         thresholds=str(out / "thresholds.json"), report=str(out / "export_report.json"))
  _write(out / "export_report.json", json.dumps(report, indent=2, default=_json_default))
  log(format_report(report))
  return report


def _integer_check(model_path, images, labels, jax_logits, lite_logits, step, label_offset,
                   reference_images: int) -> dict:
  """The file evaluated by fatq.integer.IntegerModel: with the XNNPACK delegate's arithmetic against the interpreter
  (its default kernels, as ``lite_logits``) and the JAX fake-quant model on all images; with the reference kernels'
  arithmetic against the interpreter's reference kernels on the first ``reference_images``. Expected: equal."""
  keep = ("agreement", "agreement_tie_aware", "max_logit_diff_steps", "mean_logit_diff_steps", "logits_equal")
  cmp = lambda a, b: {k: v for k, v in compare_logits(a, b, labels[:len(a)], step, label_offset).items() if k in keep}
  t0 = time.time()
  xnn = IntegerModel(model_path, kernels="xnnpack")(images)
  r = dict(top1=float(np.mean(xnn.argmax(1) == labels + label_offset)), seconds=round(time.time() - t0, 1),
           vs_interpreter=cmp(xnn, lite_logits), vs_jax_fake_quant=cmp(jax_logits, xnn))
  n = min(int(reference_images), len(images))
  if n:
    t0 = time.time()
    ref_int = IntegerModel(model_path, kernels="reference")(images[:n])
    ref = TFLiteModel(model_path, kernels="reference")(images[:n])
    r["reference"] = dict(images=n, seconds=round(time.time() - t0, 1),
                          top1=float(np.mean(ref_int.argmax(1) == labels[:n] + label_offset)),
                          vs_reference_kernels=cmp(ref_int, ref), vs_xnnpack=cmp(ref_int, xnn[:n]))
  return r


def _json_default(o):
  if isinstance(o, (np.generic, np.ndarray)):
    return o.tolist()
  raise TypeError(f"not JSON-serialisable: {type(o)}")


def format_report(r: dict) -> str:
  e, s, l = r["eval"], r["size_bytes"], r["latency_ms"]
  ok = lambda k: "ok" if e["pass"][k] else "MISSED"
  lines = [f"export report ({r['scheme']} scheme, {r['input_type']} in / {r['output_type']} out, bits {r['bits']}"
           + (f", pool on the grid of {r['pool_quantized_on']!r}" if r.get("pool_quantized_on") else "") + ")",
           f"  thresholds.json vs model.tflite: {r['readback']['matched']}/{r['readback']['tensors']} tensors equal",
           f"  top-1 on {e['images']} images: JAX fake-quant ({e.get('arithmetic', 'float')} arithmetic) "
           f"{100 * e['top1_jax']:.2f}%, interpreter "
           f"{100 * e['top1_tflite']:.2f}% (diff {e['top1_diff_points']:+.2f} points, target |diff| <= 0.2: "
           f"{ok('top1_diff_points')})",
           f"  agreement {100 * e['agreement']:.2f}% (target >= 99.5%: {ok('agreement')}), max logit diff "
           f"{e['max_logit_diff_steps']:.2f} output steps (target <= 2: {ok('max_logit_diff_steps')}), logits equal "
           f"on {100 * e['logits_equal']:.1f}% of images"]
  if e.get("layers_in_float"):
    lines.append(f"  layers computed in float arithmetic (input or kernel not straight from a quantizer): "
                 f"{', '.join(e['layers_in_float'])}")
  if e["jax_top2_tied"]:
    lines.append(f"  JAX top-2 logits tied on {100 * e['jax_top2_tied']:.2f}% of images; agreement on the others "
                 f"{100 * e['agreement_untied']:.2f}%, tie-aware agreement {100 * e['agreement_tie_aware']:.2f}%")
  if "eval_float_arithmetic" in r:
    f = r["eval_float_arithmetic"]
    lines.append(f"  the same JAX model in the float arithmetic of training: top-1 {100 * f['top1_jax']:.2f}%, agreement "
                 f"{100 * f['agreement']:.2f}% (tie-aware {100 * f['agreement_tie_aware']:.2f}%), max logit diff "
                 f"{f['max_logit_diff_steps']:.2f} steps (near-tie rounding flips, amplified: docs/export.md)")
  if "integer" in r and "error" in r["integer"]:
    lines.append(f"  fatq integer model: not evaluated ({r['integer']['error']})")
  elif "integer" in r:
    i = r["integer"]
    fmt = lambda c: (f"agreement {100 * c['agreement']:.2f}%, max {c['max_logit_diff_steps']:.0f} steps, logits "
                     f"equal on {100 * c['logits_equal']:.2f}%")
    lines.append(f"  fatq integer model (fatq.integer: TFLite's integer arithmetic in JAX), XNNPACK's: top-1 "
                 f"{100 * i['top1']:.2f}%")
    lines.append("    vs the interpreter above: " + fmt(i["vs_interpreter"]))
    lines.append("    vs JAX fake-quant: " + fmt(i["vs_jax_fake_quant"]))
    if "reference" in i:
      ref = i["reference"]
      lines.append(f"    reference kernels' arithmetic, first {ref['images']} images: top-1 {100 * ref['top1']:.2f}%; vs "
                   "TFLite's reference kernels: " + fmt(ref["vs_reference_kernels"]))
      lines.append("      vs XNNPACK's arithmetic: " + fmt(ref["vs_xnnpack"]))
  if "top1_jax_as_finetuned" in e:
    lines.append(f"  JAX top-1 as fine-tuned (float biases / pooled features): {100 * e['top1_jax_as_finetuned']:.2f}%")
  threads = sorted({k.rsplit("_", 1)[1] for k in l})
  lines.append(f"  size {s['tflite'] / 1024:.1f} KiB (float {s['float_tflite'] / 1024:.1f} KiB); latency ms "
               + ", ".join(f"{t}: {l['tflite_' + t]:.3f} (float {l['float_tflite_' + t]:.3f})" for t in threads))
  return "\n".join(lines)


def fine_tuned_row(cfg, workdir: str | os.PathLike, row: str | None = None, has: str = "checkpoint",
                   what: str = "fine-tuned") -> str:
  """``row``, or the only row of the run in ``workdir`` that has ``rows/<row>/<has>`` (its checkpoint; an exported
  row: ``tflite/model.tflite``) when ``row`` is None; raises ExportError naming the ``what`` rows otherwise (checked
  before any data is read)."""
  from fatq import experiment

  done = sorted(name for name in map(experiment.row_name, cfg.rows)
                if os.path.exists(os.path.join(workdir, "rows", name, has)))
  if row is None and len(done) == 1:
    return done[0]
  if row not in done:
    raise ExportError(f"choose a row among the {what} rows {done}" + (f" (got {row!r})" if row else ""))
  return row


def export_row(cfg, model, params: Tree, data, workdir: str | os.PathLike, row: str | None = None,
               out_dir: str | os.PathLike | None = None, **kwargs) -> dict:
  """Export one fine-tuned row of an ``experiments/finetune.py`` run and check it (:func:`export_and_check`).

  ``cfg``: the experiment config; ``model, params, data``: its float model, parameters and :class:`fatq.experiment.Data`
  (as ``fatq.tasks.prepare`` returns them); the row's checkpoint is ``WORKDIR/rows/<row>/checkpoint``. The model is
  exported from its ``impl='lax'`` form (the 'fast' rewrites export badly, SPEC §4) and evaluated in the configured
  form. Output goes to ``WORKDIR/rows/<row>/tflite`` unless ``out_dir``."""
  from fatq import experiment

  rows = {experiment.row_name(r): r for r in cfg.rows}
  row = fine_tuned_row(cfg, workdir, row)
  quant = experiment.quant_config(rows[row], experiment.base_rules(cfg))
  lax_model = model.clone(impl="lax") if hasattr(model, "impl") else model
  # The row's own model (an equalize='relu' row: ReLU instead of ReLU6); its checkpoint holds the params it was
  # fine-tuned with (equalized, bias-corrected). The float reference stays the original model and params.
  row_model = experiment.row_model(model, rows[row])
  lax_row_model = row_model.clone(impl="lax") if hasattr(row_model, "impl") else row_model
  variables = experiment.load_variables(os.path.join(workdir, "rows", row, "checkpoint"))
  out = out_dir or os.path.join(workdir, "rows", row, "tflite")
  report = export_and_check(lax_row_model.clone(quant=quant), variables, lax_model, params, data.eval_images,
                            data.eval_labels, out, label_offset=data.label_offset, eval_model=row_model, **kwargs)
  report["row"] = row
  report["workdir"] = str(workdir)
  _write(Path(out, "export_report.json"), json.dumps(report, indent=2, default=_json_default))
  return report
