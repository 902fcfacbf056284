"""Quantization-ready Flax (linen) layers.

One model definition serves three roles, chosen by the variable collections it is applied with:

* float teacher:  ``model.apply({'params': p}, x)``
* calibration:    ``model.apply({'params': p, ...}, x, mutable=['quant_stats'])`` records min/max of every
  quantization point (weights and activations) into ``quant_stats`` (and, with ``QuantConfig.track_bias_correction``,
  each layer's mean input patch); a second pass with ``mutable=['quant_search']`` sums, for activations calibrated
  with ``'mse'``, the squared error of each clipping factor, or for ``'percentile'`` and ``'entropy'`` their histogram
  (fatq.calibration.calibrate runs both);
* quantized:      ``model.apply({'params': p, 'quant_stats': s, 'quant': t}, x)`` fake-quantizes every point whose
  rule gives a spec, with ranges from the statistics scaled by the FAT factors in ``quant`` (the only trainable
  variables, with the bias offsets of layers that ``QuantConfig.learn_biases`` names: :func:`layer_bias`). Without
  ``quant`` the calibrated ranges are used as they are (post-training quantization). :func:`fold_biases` writes the
  biases as the layers apply them into ``params``.

Applying with ``mutable=['quant']`` creates the FAT factors at their initial values; ``mutable=['quant_ranges']``
additionally records each point's final range (used by export).

Within ``integer_arithmetic()`` the quantized model computes what the exported TFLite model computes, in its integer
arithmetic: each convolution / dense layer whose input and kernel come straight from quantizers multiplies the integer
codes into an int32 accumulator (plus the int32 bias) and requantizes it onto its output grid as the interpreter's
default XNNPACK kernels do (``rint(float32(acc) * (sx sw / sy))``, ties to even). The same thresholds and variables,
evaluated with the float arithmetic of training instead, differ from the interpreter by near-tie rounding flips that
the network amplifies (docs/export.md). Training always uses the float arithmetic (its straight-through gradients).

Convolutions have two implementations that compute the same numbers: ``impl='lax'`` (one
``lax.conv_general_dilated``, the form exported to TFLite) and ``impl='fast'`` (depthwise convolutions as a sum of
shifted slices and 1x1 convolutions as ``einsum``), which XLA:CPU runs several times faster (SPEC §4).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fatq import integer, quantizers
from fatq.config import QuantConfig, QuantSpec

STATS = "quant_stats"
THRESHOLDS = "quant"
# Each trained factor's bounds, (2, *factor shape): lower, upper. Recorded by an apply with it mutable
# (fatq.training.factor_bounds), for fine-tuning that projects the factors back into their bounds after each step.
FACTOR_BOUNDS = "quant_bounds"
RANGES = "quant_ranges"
# Calibration's second pass (fatq.calibration.calibrate), for activations calibrated by a search ('mse', ...):
# each such quantizer sums, over the calibration batches, what it chooses its range from, and the range so chosen
# (``min``, ``max``).
SEARCH = "quant_search"


def calibrating(module: nn.Module) -> bool:
  """True while ``module`` is applied for calibration (either pass): quantizers pass their input through."""
  return module.is_mutable_collection(STATS) or module.is_mutable_collection(SEARCH)


# Export mode (used by fatq.export): while ``export_markers()`` is active, a calibrated FakeQuant emits the identity
# primitive ``quant_marker_p`` carrying its point name instead of the fake-quant arithmetic, so that a traced jaxpr
# shows where each quantizer sits. Training and evaluation never enter this mode.
_EXPORT_MARKERS = contextvars.ContextVar("fatq_export_markers", default=False)


def _make_marker_primitive():
  from jax.extend.core import Primitive
  from jax.interpreters import mlir

  p = Primitive("fatq_quant_marker")
  p.def_impl(lambda x, **_: x)
  p.def_abstract_eval(lambda x, **_: x)
  mlir.register_lowering(p, mlir.lower_fun(lambda x, **_: x, multiple_results=False))
  return p


quant_marker_p = _make_marker_primitive()


@contextlib.contextmanager
def export_markers():
  """Within this context FakeQuant emits ``quant_marker_p(x, name=<point name>, channel_axis=<axis or None>)``."""
  token = _EXPORT_MARKERS.set(True)
  try:
    yield
  finally:
    _EXPORT_MARKERS.reset(token)


# Integer arithmetic (evaluation only): while ``integer_arithmetic()`` is active, every uniform per-tensor activation
# quantizer and every weight quantizer records the grid (scale) of the value it returns, keyed by the value itself, so
# that the layer consuming it can recover the integer codes ``round(value / scale)`` exactly.
_GRIDS = contextvars.ContextVar("fatq_integer_grids", default=None)


class IntegerLayers:
  """Which layers :func:`integer_arithmetic` computed in integer arithmetic, and which fell back to float (their input
  or kernel did not come straight from a quantizer, the layer has no uniform output quantizer, or a residual add
  lacks the export's grids)."""

  def __init__(self, grids=None, scheme: str = "int8"):
    if scheme not in ("int8", "uint8"):
      raise ValueError(f"scheme must be 'int8' or 'uint8', got {scheme!r}")
    self.exported = {name: quantizers.QuantParams(*(np.asarray(v, np.float32) for v in g[:2]), *g[2:])
                     for name, g in (grids or {}).items()}
    self.scheme = scheme
    self.grids: dict[int, tuple[jax.Array, jax.Array, jax.Array]] = {}
    self.integer: list[str] = []
    self.float: list[str] = []


@contextlib.contextmanager
def integer_arithmetic(grids: dict | None = None, scheme: str = "int8"):
  """Evaluate quantized models in the integer arithmetic of their TFLite export (see the module docstring).

  ``grids``: ``{point name: QuantParams}``, the grid each quantization point has in the exported file
  (:meth:`fatq.export.Exported.grids`). With them the evaluation uses the file's scales and zero points, bit for
  bit: activations are computed on them, and weights (given to the converter on the model's grid) are re-quantized
  onto them, as the converter does where it changed a scale (all-zero channels, near-dead channels whose int32 bias
  codes would overflow, symmetrized weights). The model's own grids equal the file's up to a float32 ulp where XLA
  compiles the threshold arithmetic differently; residual adds need the file's grids (their fixed-point multipliers
  are computed on the host). Points without a grid here use the model's. ``scheme``: the stored codes, int8 or
  uint8 (it decides which way the average pool's exact ties round).

  Trace inside the context (``jax.jit`` caches traces: jit a new function here). Yields an :class:`IntegerLayers`
  filled while tracing::

      with integer_arithmetic(exported.grids()) as layers:
        logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
      assert not layers.float
  """
  layers = IntegerLayers(grids, scheme)
  token = _GRIDS.set(layers)
  try:
    yield layers
  finally:
    _GRIDS.reset(token)


def _set_grid(value: jax.Array, scale: jax.Array, zero_point: jax.Array) -> None:
  """``value`` is ``(q - zero_point) scale`` with ``q`` the stored codes (int8 or uint8) of the export."""
  layers = _GRIDS.get()
  if layers is not None:  # the value is kept: its id cannot be reused while the context lives
    layers.grids[id(value)] = (value, scale, zero_point)


def _grid(value: jax.Array) -> tuple[jax.Array, jax.Array] | None:
  layers = _GRIDS.get()
  entry = layers.grids.get(id(value)) if layers is not None else None
  return entry[1:] if entry is not None and entry[0] is value else None


def grid_of(value: jax.Array) -> jax.Array | None:
  """The scale of the quantization grid ``value`` lies on, inside :func:`integer_arithmetic` (else None)."""
  grid = _grid(value)
  return None if grid is None else grid[0]


def on_grid_of(source: jax.Array, value: jax.Array) -> jax.Array:
  """``value``, computed from ``source`` by an op that keeps its values (max pool, reshape), stays on its grid."""
  grid = _grid(source)
  if grid is not None:
    _set_grid(value, *grid)
  return value


def global_average_pool(x: jax.Array) -> jax.Array:
  """The mean over the spatial axes of NHWC ``x``. In integer arithmetic, on a per-tensor grid, as TFLite's
  AVERAGE_POOL_2D computes it: the stored codes' sum over ``n`` pixels, divided by ``n`` rounding half away from zero
  (which the float mean, rounded by a quantizer afterwards, does not do at exact ties), on the same grid."""
  grid = _grid(x)
  if grid is None or grid[0].size != 1:
    return jnp.mean(x, axis=(1, 2))
  scale, zero_point = grid
  n = x.shape[1] * x.shape[2]
  total = jnp.sum(jnp.round(x / scale).astype(jnp.int32) + zero_point.astype(jnp.int32), axis=(1, 2))
  codes = integer.divide_round_half_away(total, n)
  y = (codes - zero_point).astype(jnp.float32) * scale
  _set_grid(y, scale, zero_point)
  return y


ACTIVATIONS = {"none": lambda x: x, "relu": nn.relu, "relu6": nn.relu6, "tanh": jnp.tanh}
# Optional ``params`` leaf of a QConv with ReLU6: the upper bound per output channel (default 6 for all).
RELU6_BOUND = "relu6_bound"
# calibration='mse' and 'entropy': the clipping factors tried, 1.0 first (kept on ties), then down to 0.2 in steps of
# 0.01.
CLIP_FACTORS = np.linspace(1.0, 0.2, 81, dtype=np.float32)


def _initial_factor(name: str, init: float, shape) -> jax.Array:
  """A FAT factor at its initial value (the calibrated range), for :meth:`FakeQuant.range`'s ``factor``."""
  return jnp.full(shape, init, jnp.float32)


class FakeQuant(nn.Module):
  """Calibrates, then fake-quantizes one tensor according to ``spec`` (see the module docstring for the modes)."""

  spec: QuantSpec
  weights: bool = False  # quantizes a layer's weights (see integer_arithmetic's grids)

  def _channel_axis(self, x: jax.Array) -> int:
    """The spec's ``channel_axis`` as an index into ``x``'s axes (a value out of range would wrap to another axis)."""
    axis = self.spec.channel_axis
    if not -x.ndim <= axis < x.ndim:
      raise ValueError(f"{self._point() or 'FakeQuant'}: channel_axis={axis} is out of range for a tensor of shape "
                       f"{x.shape}; per-channel ranges need an axis in [{-x.ndim}, {x.ndim - 1}] (-1: the last)")
    return axis % x.ndim

  def _reduce_axes(self, x: jax.Array) -> tuple[int, ...]:
    if not self.spec.per_channel:
      return tuple(range(x.ndim))
    channel = self._channel_axis(x)
    return tuple(a for a in range(x.ndim) if a != channel)

  def _factor(self, name: str, init: float, shape) -> jax.Array:
    if self.spec.trainable and (self.has_variable(THRESHOLDS, name) or self.is_mutable_collection(THRESHOLDS)):
      return self.variable(THRESHOLDS, name, lambda: _initial_factor(name, init, shape)).value
    return _initial_factor(name, init, shape)

  def range(self, t_left: jax.Array | None = None, t_right: jax.Array | None = None,
            factor=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lo, hi, narrow_range)`` after applying the FAT factors to the calibrated statistics. ``t_left``,
    ``t_right``: other statistics, and ``factor(name, init, shape)`` other factors (default: this module's)."""
    s = self.spec
    if t_left is None:
      t_left, t_right = self.get_variable(STATS, "min"), self.get_variable(STATS, "max")
    factor = factor or self._factor
    signed = self._signed(t_left)
    if s.symmetric:
      t_max = jnp.maximum(jnp.abs(t_left), jnp.abs(t_right))
      self._record_bounds("scale", s.scale_bounds, t_max.shape)
      lo, hi = quantizers.symmetric_range(factor("scale", 1.0, t_max.shape), t_max, signed, s.scale_bounds)
      return lo, hi, signed  # signed symmetric grids are narrow: zero point exactly 0
    shift_bounds = tuple(jnp.where(signed, a, b) for a, b in zip(s.signed_shift_bounds, s.unsigned_shift_bounds))
    self._record_bounds("shift", shift_bounds, t_left.shape)
    self._record_bounds("width", s.scale_bounds, t_left.shape)
    t_left, t_right = quantizers.containing_zero(t_left, t_right)
    lo, hi = quantizers.asymmetric_range(factor("shift", 0.0, t_left.shape), factor("width", 1.0, t_left.shape),
                                         t_left, t_right, shift_bounds, s.scale_bounds)
    return lo, hi, jnp.asarray(False)

  def _record_bounds(self, name: str, bounds, shape) -> None:
    if self.spec.trainable and self.is_mutable_collection(FACTOR_BOUNDS):
      lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), shape) for b in bounds)
      self.put_variable(FACTOR_BOUNDS, name, jnp.stack([lo, hi]))

  def _signed(self, t_left: jax.Array) -> jax.Array:
    """Whether the grid is signed: the spec's ``signed``, or (None) whether the calibrated minimum is negative."""
    return jnp.min(t_left) < 0 if self.spec.signed is None else jnp.asarray(self.spec.signed)

  def _point(self) -> str:
    """The quantization point's name (``conv1/kernel``): the module path without the ``_quant`` suffix."""
    return "/".join((*self.path[:-1], self.path[-1].removesuffix("_quant"))) if self.path else ""

  def _slice_shape(self, x: jax.Array) -> list[int]:
    """The shape that broadcasts one range per slice against ``x``: [] per tensor, 1s but the channel axis per
    channel."""
    if not self.spec.per_channel:
      return []
    shape = [1] * x.ndim
    shape[self._channel_axis(x)] = -1
    return shape

  def _search(self, x: jax.Array, t_left: jax.Array, t_right: jax.Array,
              axes: tuple[int, ...]) -> dict[str, jax.Array]:
    """What :meth:`_searched_range` chooses this quantizer's range from, for ``x`` and its min/max range ``[t_left,
    t_right]``, per slice; sums, so that the batches of calibration add up:

    * ``'mse'``: ``error``, ``sum (Q_a(x) - x)^2`` for each clipping factor ``a`` of CLIP_FACTORS, ``Q_a`` this
      quantizer's grid (the FAT factors at their initial values) on the range ``a (t_left, t_right)``;
    * ``'percentile'`` and ``'entropy'``: ``histogram``, the counts of ``|x|`` (symmetric grids) or ``x`` over
      :meth:`_histogram_range` (:func:`fatq.quantizers.histogram`)."""
    shape = self._slice_shape(x)
    if self.spec.calibration == "mse":
      def error(alpha):
        lo, hi, narrow = self.range(alpha * t_left, alpha * t_right, factor=_initial_factor)
        q = quantizers.fake_quant(x, lo.reshape(shape), hi.reshape(shape), self.spec.bits, narrow)
        return jnp.sum(jnp.square(q - x), axis=axes)

      return {"error": quantizers.clip_errors(error, CLIP_FACTORS)}
    values, lo, hi = x, *self._histogram_range(t_left, t_right)
    if self.spec.symmetric:
      values = jnp.abs(x)
    if self.spec.per_channel:  # (n, channels): the channel axis last
      values = jnp.moveaxis(values, self.spec.channel_axis, -1).reshape(-1, values.shape[self.spec.channel_axis])
    return {"histogram": quantizers.histogram(values.reshape(-1, *jnp.shape(lo)), lo, hi)}

  def _histogram_range(self, t_left: jax.Array, t_right: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Where :meth:`_search` counts values: ``[0, T_max]`` (of ``|x|``) for symmetric grids; the min/max range for
    ``'percentile'`` (its quantiles), widened to contain 0 for ``'entropy'``, whose windows are the grid's ranges
    (``containing_zero(a t_left, a t_right)``, :meth:`range`)."""
    if self.spec.symmetric:
      return jnp.zeros_like(t_left), jnp.maximum(jnp.abs(t_left), jnp.abs(t_right))
    return quantizers.containing_zero(t_left, t_right) if self.spec.calibration == "entropy" else (t_left, t_right)

  def _searched_range(self, found: dict[str, jax.Array], t_left: jax.Array,
                      t_right: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The range ``(t_left', t_right')`` that the spec's calibration chooses from the min/max range and what
    :meth:`_search` found: ``alpha* (t_left, t_right)`` with the ``alpha*`` of CLIP_FACTORS of least error
    (:func:`fatq.quantizers.mse_clip`) for ``'mse'``, of least divergence from the histogram
    (:func:`fatq.quantizers.entropy_divergences`, ``levels`` the grid's steps over the histogram's range) for
    ``'entropy'``; :func:`fatq.quantizers.percentile_range` for ``'percentile'``."""
    s = self.spec
    if s.calibration == "percentile":
      return quantizers.percentile_range(found["histogram"], t_left, t_right, s.percentile, s.symmetric)
    if s.calibration == "mse":
      errors = found["error"]
    else:  # entropy: a signed symmetric grid has 2^(b-1) - 1 steps over [0, T] (narrow range), others 2^b - 1
      steps = jnp.where(self._signed(t_left) & s.symmetric, 2**(s.bits - 1) - 1, 2**s.bits - 1)
      errors = quantizers.entropy_divergences(found["histogram"], *self._histogram_range(t_left, t_right),
                                              CLIP_FACTORS, steps)
    alpha = quantizers.mse_clip(errors, CLIP_FACTORS)
    return alpha * t_left, alpha * t_right

  def _searched_statistics(self, x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """A kernel's range by a search (``'mse'``, ...), from the kernel itself, per slice. A kernel is the same on
    every calibration batch, so its range is searched on the first and kept. (Activations are searched over all
    batches: ``__call__``'s SEARCH pass.)"""
    t_left, t_right = jnp.min(x, axis=axes), jnp.max(x, axis=axes)
    return self._searched_range(self._search(x, t_left, t_right, axes), t_left, t_right)

  def _grid_shift(self, x: jax.Array) -> jax.Array:
    """``Q(x) - Q0(x)``: ``x`` on the current grid minus ``x`` on the calibrated one (see ``__call__``)."""
    if _EXPORT_MARKERS.get():
      raise ValueError(f"{self._point()}: a tracked bias correction is for training and evaluation; fold it into "
                       "the biases (fatq.layers.fold_biases) before export")
    shape = self._slice_shape(x)

    def fake_quant(factor):
      lo, hi, narrow = self.range(factor=factor)
      return quantizers.fake_quant(x, lo.reshape(shape), hi.reshape(shape), self.spec.bits, narrow)

    return fake_quant(self._factor) - fake_quant(_initial_factor)

  def _factor_names(self) -> tuple[str, ...]:
    return ("scale",) if self.spec.symmetric else ("shift", "width")

  def _linearized(self, x: jax.Array, lo: jax.Array, hi: jax.Array, narrow) -> quantizers.Linearized:
    """``x`` fake-quantized on ``[lo, hi]`` (this quantizer's range, broadcast against ``x``) as
    :class:`fatq.quantizers.Linearized` in its FAT factors. Exact in value and gradient: each entry of a factor
    moves one slice's range (the whole tensor's, or one channel's)."""
    factors = {name: self.get_variable(THRESHOLDS, name) for name in self._factor_names()}
    fixed = jax.lax.stop_gradient(factors)
    lo, hi = jax.lax.stop_gradient((lo, hi))
    shape = self._slice_shape(x)

    def grid(values):
      lo, hi, _ = self.range(factor=lambda name, init, _shape: values[name])
      return lo.reshape(shape), hi.reshape(shape)

    directions, probes = [], []
    for name in factors:
      along = {other: (jnp.ones_like if other == name else jnp.zeros_like)(v) for other, v in fixed.items()}
      _, (lo_dot, hi_dot) = jax.jvp(grid, (fixed,), (along,))
      directions.append(quantizers.fake_quant_tangent(x, lo, hi, lo_dot, hi_dot, self.spec.bits, narrow))
      probes.append((factors[name] - fixed[name]).reshape(shape))
    return quantizers.Linearized(quantizers.fake_quant(x, lo, hi, self.spec.bits, narrow), tuple(directions),
                                 tuple(probes))

  @nn.compact
  def __call__(self, x: jax.Array, requantize=None, activation=None, grid_shift: bool = False,
               linearize: bool = False) -> jax.Array | quantizers.Linearized:
    """Fake-quantize ``x``. With ``requantize`` (integer arithmetic, :func:`integer_arithmetic`): an integer op's
    output, ``requantize(scale)`` giving its codes (relative to the zero point) on this quantizer's grid of
    ``scale``; then ``activation`` (a monotone clamp: its bounds' codes, as TFLite's fused activations) and the
    grid's clip. ``grid_shift``: instead, ``Q(x) - Q0(x)``, how far the current thresholds move ``x`` from where
    the calibrated ones (the FAT factors at their initial values) put it, in float arithmetic; zero uncalibrated
    (``QuantConfig.track_bias_correction``). ``linearize``: where the FAT factors are being trained (present, not
    being created), return :class:`fatq.quantizers.Linearized` instead of an array (same value, same gradient)."""
    axes = self._reduce_axes(x)
    if self.is_mutable_collection(STATS):
      keep = tuple(x.shape[a] for a in range(x.ndim) if a not in axes)
      searched = self.has_variable(STATS, "min")  # a later batch: the same weights, the same searched range
      lo = self.variable(STATS, "min", lambda: jnp.full(keep, jnp.inf, jnp.float32))
      hi = self.variable(STATS, "max", lambda: jnp.full(keep, -jnp.inf, jnp.float32))
      if self.spec.calibration != "minmax" and self.weights:
        if not searched:
          lo.value, hi.value = self._searched_statistics(x, axes)
      else:  # searched activations too: their min/max first, from which the SEARCH pass chooses
        lo.value = jnp.minimum(lo.value, jnp.min(x, axis=axes))
        hi.value = jnp.maximum(hi.value, jnp.max(x, axis=axes))
      return x
    if self.is_mutable_collection(SEARCH):  # calibration's second pass: float, as the first
      if self.spec.calibration != "minmax" and not self.weights:
        t_left, t_right = self.get_variable(STATS, "min"), self.get_variable(STATS, "max")
        found = {}
        for name, value in self._search(x, t_left, t_right, axes).items():
          total = self.variable(SEARCH, name, jnp.zeros, value.shape, jnp.float32)
          total.value = found[name] = total.value + value
        # the range chosen from the batches so far: after the last, the calibrated one (fatq.calibration)
        for name, value in zip(("min", "max"), self._searched_range(found, t_left, t_right)):
          self.put_variable(SEARCH, name, value)
      return jnp.zeros_like(x) if grid_shift else x
    if not self.has_variable(STATS, "min"):
      return jnp.zeros_like(x) if grid_shift else x  # float: not calibrated
    if grid_shift:
      return self._grid_shift(x)
    if requantize is not None and (_EXPORT_MARKERS.get() or self.spec.kind != "uniform"):
      raise ValueError(f"{'/'.join(self.path)}: an integer op's output can only be requantized by a calibrated "
                       "uniform quantizer outside export")
    name = self._point()
    if _EXPORT_MARKERS.get():
      axis = self._channel_axis(x) if self.spec.per_channel else None
      return quant_marker_p.bind(x, name=name, channel_axis=axis)
    if self.spec.kind != "uniform":  # power of two, fixed point, LSQ: fatq.workbench.quantizers
      from fatq.workbench import quantizers as extra
      return extra.apply_spec(self, x)
    lo, hi, narrow = self.range()
    shape = self._slice_shape(x)
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    p = quantizers.nudge(lo, hi, self.spec.bits, narrow)
    if self.is_mutable_collection(RANGES):
      if requantize is not None:
        raise ValueError(f"{'/'.join(self.path)}: integer arithmetic is for evaluation; record ranges outside "
                         "integer_arithmetic()")
      for key, value in dict(lo=lo, hi=hi, scale=p.scale, zero_point=p.zero_point, qmin=p.qmin,
                             qmax=p.qmax, bits=self.spec.bits).items():
        self.put_variable(RANGES, key, jnp.squeeze(jnp.asarray(value, jnp.float32)))
    layers = _GRIDS.get()
    if layers is None:
      # linearized slices lie along the last axis (what the fast depthwise kernel sums over); others stay dense
      last = not self.spec.per_channel or self._channel_axis(x) == x.ndim - 1
      if linearize and last and self.spec.trainable and not self.is_mutable_collection(THRESHOLDS) and all(
          self.has_variable(THRESHOLDS, name) for name in self._factor_names()):
        return self._linearized(x, lo, hi, narrow)
      return quantizers.fake_quant(x, lo, hi, self.spec.bits, narrow)
    # evaluation in integer arithmetic: the values on the grid, divisions correctly rounded (the file's codes)
    exported = layers.exported.get(name)
    if exported is not None:
      if self.weights:  # the converter is given the model's weights (on its grid) and quantizes them on the file's
        x = (quantizers.quantize(x, p) - p.zero_point) * p.scale
      p = quantizers.QuantParams(exported.scale.reshape(shape), exported.zero_point.reshape(shape), *exported[2:])
    if requantize is None:
      out = (quantizers.quantize(x, p) - p.zero_point) * p.scale
    else:  # the activation (a monotone clamp) and the grid's clip on the codes: no per-element division
      act = activation or ACTIVATIONS["none"]
      lo_code, hi_code = (quantizers.quantize(act(v), p) - p.zero_point for v in (p.nudged_min, p.nudged_max))
      out = jnp.clip(requantize(p.scale), lo_code, hi_code) * p.scale
    if not self.spec.per_channel or self._channel_axis(x) == x.ndim - 1:  # a grid a layer can consume
      # the stored codes: the n-bit grid's codes in an 8-bit carrier, signed for int8
      carrier = 2 ** (self.spec.bits - 1) if layers.scheme == "int8" else 2 ** (self.spec.bits - 1) - 128
      _set_grid(out, p.scale, p.zero_point - carrier)
    return out


def quant_point(module: nn.Module, quant: QuantConfig | None, role: str, x: jax.Array) -> jax.Array:
  """Fake-quantize ``x``, named ``<module path>/<role>``, if a rule of ``quant`` gives it a spec.

  Call from inside a module's compact method: the quantizer becomes a submodule ``<role>_quant``.
  """
  quantizer = quantizer_for(module, quant, role)
  return x if quantizer is None else quantizer(x)


def quantizer_for(module: nn.Module, quant: QuantConfig | None, role: str) -> FakeQuant | None:
  """The quantizer of point ``<module path>/<role>`` (a submodule ``<role>_quant``), None if no rule quantizes it."""
  spec = None if quant is None else quant.spec_for(point_name(module, role))
  return None if spec is None else FakeQuant(spec, weights=role == "kernel", name=f"{role}_quant")


def point_name(module: nn.Module, role: str) -> str:
  return "/".join((*module.path, role))


def _integer_layer(module: nn.Module, x: jax.Array, kernel: jax.Array, bias: jax.Array | None, contract,
                   activation: str) -> jax.Array | None:
  """A conv / dense layer's output in integer arithmetic (:func:`integer_arithmetic`), None outside it or where the
  layer cannot be computed so (then it is listed in ``IntegerLayers.float``).

  ``contract(x_codes, w_codes)`` is the layer's convolution or matrix product (of integer codes, exact). The
  accumulator gets the int32 bias ``round(b / (sx sw))`` (the exported bias: exact for snapped biases,
  :meth:`fatq.export.Exported.snap_biases`) and goes to the output quantizer, which requantizes it with
  ``sx sw / sy`` as XNNPACK does.
  """
  layers = _GRIDS.get()
  if layers is None:
    return None
  sx, sw = grid_of(x), grid_of(kernel)
  out_spec = None if module.quant is None else module.quant.spec_for(point_name(module, "output"))
  name = "/".join(module.path)
  if (sx is None or sw is None or sx.size != 1 or out_spec is None or out_spec.kind != "uniform"
      or activation not in ("none", "relu", "relu6") or module.has_variable("params", RELU6_BOUND)):
    layers.float.append(name)
    return None
  # codes relative to the zero point (x = (q - z) sx exactly up to float32 rounding, far below half a step),
  # contracted in float64: exact (|acc| < 2^53), and XLA:CPU's float convolutions are many times faster than its int32
  with jax.enable_x64(True):
    acc = contract(jnp.round(x / sx).astype(jnp.float64), jnp.round(kernel / sw).astype(jnp.float64))
    acc = acc.astype(jnp.int32)
  sx, sw = sx.reshape(()), sw.reshape(-1)
  acc_scale = sx * sw  # float32 per output channel, XNNPACK's sx sw
  if bias is not None:
    acc = acc + quantizers.quantize_bias(bias, sx, sw)
  layers.integer.append(name)

  def requantize(scale):  # XNNPACK: rint(float32(acc) * float32(sx sw / sy)), ties to even; exact_divide: XLA
    return jnp.round(acc.astype(jnp.float32) * quantizers.exact_divide(acc_scale, scale))  # rewrites divisions

  return FakeQuant(out_spec, name="output_quant")(acc, requantize=requantize, activation=ACTIVATIONS[activation])


def residual_add(module: nn.Module, quant: QuantConfig | None, x: jax.Array, y: jax.Array) -> jax.Array:
  """``x + y`` quantized at point ``<module path>/add`` (if a rule of ``quant`` quantizes it).

  In :func:`integer_arithmetic` with the export's grids of both inputs and of the sum, the XNNPACK delegate's ADD:
  the fixed-point sum of the codes (:func:`fatq.integer.add_codes`), which rounds unlike the float sum at near-ties.
  Without them (or with per-channel inputs) the float sum, listed in ``IntegerLayers.float``."""
  quantizer = quantizer_for(module, quant, "add")
  if quantizer is None:
    return x + y
  layers, name = _GRIDS.get(), point_name(module, "add")
  if layers is None:
    return quantizer(x + y)
  gx, gy, out = _grid(x), _grid(y), layers.exported.get(name)
  scales = [_concrete(g[0]) for g in (gx, gy) if g is not None]
  if len(scales) < 2 or any(s is None or s.size != 1 for s in scales) or out is None or out.scale.size != 1:
    layers.float.append(name)
    return quantizer(x + y)

  def requantize(scale):
    with jax.enable_x64(True):  # TFLite's fixed point needs 64-bit products
      codes = [jnp.round(v / s).astype(jnp.int64) for v, s in zip((x, y), scales)]
      return integer.add_codes(*codes, *scales, np.asarray(scale), kernels="xnnpack").astype(jnp.float32)

  layers.integer.append(name)
  return quantizer(x + y, requantize=requantize)


def requantized_mean(module: nn.Module, quant: QuantConfig | None, x: jax.Array) -> jax.Array:
  """The mean over the spatial axes of NHWC ``x``, quantized at point ``<module path>/pool`` (if a rule of ``quant``
  quantizes it): TFLite's MEAN with an output grid of its own (TF2 post-training quantization), or the pool on its
  input's grid (:func:`fatq.export.tie_pool`: AVERAGE_POOL_2D).

  In :func:`integer_arithmetic`, with ``x`` on a per-tensor grid ``sx``: on a grid of its own ``sy``, as the XNNPACK
  delegate computes MEAN (measured equal on every pooled code of the MobileNet v2 PTQ int8 file), the sum of the
  ``n`` codes requantized once, ``rint(float32(sum) * float32(sx / (n sy)))`` (rounding the mean onto ``x``'s grid
  first would round twice); on ``x``'s grid, as AVERAGE_POOL_2D (:func:`global_average_pool`)."""
  quantizer = quantizer_for(module, quant, "pool")
  if quantizer is None:
    return global_average_pool(x)
  grid, layers = _grid(x), _GRIDS.get()
  if layers is None or grid is None or grid[0].size != 1:
    if layers is not None:
      layers.float.append(point_name(module, "pool"))
    return quantizer(jnp.mean(x, axis=(1, 2)))
  n = x.shape[1] * x.shape[2]
  sx = grid[0].reshape(())
  total = jnp.sum(jnp.round(x / sx), axis=(1, 2))  # codes relative to the zero point: exact (|total| < 2^24)
  pooled = global_average_pool(x)
  layers.integer.append(point_name(module, "pool"))

  def requantize(scale):  # the same scale: the same grid (tie_pool), where AVERAGE_POOL_2D rounds ties differently
    return jnp.where(scale == sx, jnp.round(pooled / sx), jnp.round(total * quantizers.exact_divide(sx, n * scale)))

  return quantizer(pooled, requantize=requantize)


def _concrete(value) -> np.ndarray | None:
  """``value`` as a numpy array if it is known while tracing (an exported grid), else None."""
  try:
    return np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    return None


def _intrinsic_spec(module: nn.Module) -> QuantSpec | None:
  """A fixed-point ``output`` spec with ``placement='intrinsic'`` (None for every other configuration)."""
  if module.quant is None:
    return None
  from fatq.workbench import quantizers as extra
  return extra.intrinsic_spec(module)


# ---------------------------------------------------------------------------------------------------------------------
# Convolutions.


def _pads(in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int], padding) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return list(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
  return [tuple(p) for p in padding]


def _depthwise_by_slices(x: jax.Array, kernel: jax.Array, strides, pads) -> jax.Array:
  """Depthwise conv (channel multiplier 1) as ``sum_ij shift_ij(x) * w[i, j]``: no grouped convolution."""
  return _depthwise(x, kernel, tuple(strides), tuple(tuple(p) for p in pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, pads):
  """``_depthwise_by_slices`` with its backward pass written out.

  ``dx`` is the same sum of slices over the cotangent dilated by the stride and padded by ``k - 1``, with the kernel
  flipped: one fused pass, where autodiff materialises one padded copy per tap. ``dk[i, j] = sum(g * shift_ij(x))``.
  """
  return _depthwise_slices(x, kernel, strides, pads)


def _depthwise_fwd(x, kernel, strides, pads):
  return _depthwise_slices(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  (sh, sw), (ph, pw) = strides, pads
  hp, wp = x.shape[1] + ph[0] + ph[1], x.shape[2] + pw[0] + pw[1]
  # dilated g, placed so that correlating it with the flipped kernel gives the padded input's gradient
  zero = jnp.zeros((), g.dtype)
  gd = lax.pad(g, zero, [(0, 0, 0), (kh - 1, hp - (g.shape[1] - 1) * sh - 1, sh - 1),
                         (kw - 1, wp - (g.shape[2] - 1) * sw - 1, sw - 1), (0, 0, 0)])
  dxp = _depthwise_slices(gd, kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)))
  dx = dxp[:, ph[0]:ph[0] + x.shape[1], pw[0]:pw[0] + x.shape[2]]
  xp = jnp.pad(x, [(0, 0), ph, pw, (0, 0)])
  dk = jnp.stack([jnp.sum(_tap(xp, i, j, strides, g.shape[1:3]) * g, axis=(0, 1, 2))
                  for i in range(kh) for j in range(kw)]).reshape(kernel.shape)
  return dx, dk


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _depthwise_linearized(x, kernel, directions, probes, strides, pads):
  """``_depthwise_by_slices(x, kernel + sum_i probes[i] * directions[i])`` (a :class:`fatq.quantizers.Linearized`
  kernel; probes of shape ``()`` or ``(1, 1, 1, C)``), with the probes' gradient taken forward:

      d/dp_i[c] = sum_{n,h,w} g[n,h,w,c] * depthwise(x, directions[i])[n,h,w,c]

  one more depthwise pass and one product-sum per direction (a symmetric quantizer has one). The kernel's gradient,
  through which the factors' would otherwise go, writes out the 9 shifted inputs and reduces each against ``g``:
  the largest piece of MobileNet v2's threshold gradient (docs/speed.md). The kernel's and directions'
  gradients are still returned, for other uses; XLA drops them when nothing uses them (FAT's training step).
  """
  return _depthwise_linearized_fwd(x, kernel, directions, probes, strides, pads)[0]


def _materialized(a: jax.Array) -> jax.Array:
  """``a`` (finite, channels last), computed once: as its product with the identity matrix, exact, which XLA does
  not fuse into its users. A kernel's quantization and its tangents are small element-wise chains that XLA:CPU
  otherwise fuses into each full-size consumer, recomputing them for every output pixel: MobileNet v2's threshold
  gradient at batch 32 took 2.6-3.6 s that way, 1.4-1.5 s with this (one-off A/B runs)."""
  c = a.shape[-1]
  return jnp.dot(a.reshape(-1, c), jnp.eye(c, dtype=a.dtype), precision=lax.Precision.HIGHEST).reshape(a.shape)


def _depthwise_linearized_fwd(x, kernel, directions, probes, strides, pads):
  kernel = _materialized(quantizers.Linearized(kernel, directions, probes).dense())
  directions = tuple(_materialized(d) for d in directions)
  return _depthwise_slices(x, kernel, strides, pads), (x, kernel, directions, probes)


def _depthwise_linearized_bwd(strides, pads, res, g):
  x, kernel, directions, probes = res
  dx, dk = _depthwise_bwd(strides, pads, (x, kernel), g)
  dprobes = tuple(quantizers.sum_to(jnp.sum(g * _depthwise_slices(x, d, strides, pads), (0, 1, 2), keepdims=True),
                                    p.shape) for d, p in zip(directions, probes))
  return dx, dk, tuple(p * dk for p in probes), dprobes


_depthwise_linearized.defvjp(_depthwise_linearized_fwd, _depthwise_linearized_bwd)


def _tap(xp, i, j, strides, out_hw):
  """The input pixels that tap ``(i, j)`` of the kernel meets, one per output pixel."""
  (sh, sw), (ho, wo) = strides, out_hw
  return lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]),
                   (1, sh, sw, 1))


def _depthwise_slices(x, kernel, strides, pads):
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  x = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      term = _tap(x, i, j, strides, (ho, wo)) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def _pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 convolution ``y[n,h,w,d] = sum_c x[n,h,w,c] k[c,d]`` as a matrix product.

  Backward: ``dx = g k^T`` and ``dk = x^T g`` over all pixels, both matrix products.
  """
  return jnp.einsum("nhwc,cd->nhwd", x, kernel)


def _pointwise_fwd(x, kernel):
  return _pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(res, g):
  x, kernel = res
  c, d = kernel.shape
  dk = jnp.dot(x.reshape(-1, c).T, g.reshape(-1, d), precision=lax.Precision.HIGHEST)
  return jnp.einsum("nhwd,cd->nhwc", g, kernel), dk


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def is_fast_depthwise(x_channels: int, kernel_shape: Sequence[int], groups: int, impl: str) -> bool:
  """Whether :func:`conv2d` computes this convolution as ``impl='fast'``'s depthwise sum of slices."""
  return impl == "fast" and groups == x_channels and kernel_shape[2] == 1 and kernel_shape[3] == groups


def conv2d(x: jax.Array, kernel: jax.Array | quantizers.Linearized, strides=(1, 1), padding="SAME",
           groups: int = 1, impl: str = "lax") -> jax.Array:
  """NHWC x HWIO convolution. ``impl='fast'`` rewrites depthwise and 1x1 convolutions (same numbers). A
  :class:`fatq.quantizers.Linearized` kernel gives a fast depthwise convolution the gradient of its factors
  without the kernel's (:func:`_depthwise_linearized`)."""
  strides = tuple(strides)
  kh, kw, cin_per_group, cout = kernel.value.shape if isinstance(kernel, quantizers.Linearized) else kernel.shape
  if impl not in ("lax", "fast"):
    raise ValueError(f"unknown convolution impl {impl!r}; choose 'lax' or 'fast'")
  pads = _pads(x.shape[1:3], (kh, kw), strides, padding)
  if is_fast_depthwise(x.shape[-1], (kh, kw, cin_per_group, cout), groups, impl):
    if isinstance(kernel, quantizers.Linearized):
      return _depthwise_linearized(x, *kernel, strides, tuple(tuple(p) for p in pads))
    return _depthwise_by_slices(x, kernel, strides, pads)
  if isinstance(kernel, quantizers.Linearized):
    kernel = kernel.dense()
  if impl == "fast":
    if groups == 1 and (kh, kw) == (1, 1) and all(p == (0, 0) for p in pads):
      return _pointwise(x[:, ::strides[0], ::strides[1]], kernel[0, 0])
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


BIAS_OFFSET = "bias_offset"
INPUT_MEAN, INPUT_COUNT = "input_mean", "input_count"  # quant_stats of a layer that tracks its bias correction
BIASES = "biases"  # collection: each layer's bias as applied (offsets and tracked correction included): fold_biases


def layer_bias(module: nn.Module, x: jax.Array, kernel: jax.Array, quantizer: FakeQuant | None) -> jax.Array:
  """The bias a QConv / QDense adds: ``params/bias``,

  * plus its learned offset ``quant/bias_offset`` where the config's ``learn_biases`` names the layer (created, at
    zero, where the ``quant`` collection is being initialised);
  * minus ``E[(W_q - W_q0) x]`` where the config has ``track_bias_correction`` (see :class:`QuantConfig`): the mean
    input patch ``E[x]`` is recorded in calibration (over the calibration images, in float), and ``W_q - W_q0`` is
    the kernel's grid shift (:meth:`FakeQuant.__call__`), exactly zero at the calibrated thresholds.

  ``x``: the layer's input; ``kernel``: its float kernel; ``quantizer``: the kernel's quantizer (None: float)."""
  bias = module.param("bias", nn.initializers.zeros, (module.features,))
  quant = module.quant
  if quant is not None and quant.learns_bias("/".join(module.path)) and (
      module.has_variable(THRESHOLDS, BIAS_OFFSET) or module.is_mutable_collection(THRESHOLDS)):
    bias = bias + module.variable(THRESHOLDS, BIAS_OFFSET, lambda: jnp.zeros(bias.shape, jnp.float32)).value
  if quant is not None and quant.track_bias_correction and quantizer is not None:
    if quantizer.spec.kind != "uniform":
      raise ValueError(f"{point_name(module, 'kernel')}: track_bias_correction follows a uniform weight grid; this "
                       f"kernel's is kind={quantizer.spec.kind!r} (use a plain bias correction for it)")
    if module.is_mutable_collection(STATS):
      _record_input_mean(module, x, kernel.shape)
    elif module.has_variable(STATS, INPUT_MEAN):  # absent in float, and once folded
      shift = quantizer(kernel, grid_shift=True)
      bias = bias - mean_output(shift, module.get_variable(STATS, INPUT_MEAN), getattr(module, "groups", 1))
  if module.is_mutable_collection(BIASES):
    module.put_variable(BIASES, "bias", bias)
  return bias


def _record_input_mean(module: nn.Module, x: jax.Array, kernel_shape) -> None:
  """Running mean, over calibration batches, of the input patch each output position multiplies with the kernel:
  ``(kh, kw, cin)`` for a convolution (padding zeros included), ``(cin,)`` for a dense layer."""
  if len(kernel_shape) == 4:
    kh, kw = kernel_shape[:2]
    pads = _pads(x.shape[1:3], (kh, kw), module.strides, module.padding)
    xp = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    out_hw = tuple((xp.shape[a + 1] - k) // s + 1 for a, (k, s) in enumerate(zip((kh, kw), module.strides)))
    batch = jnp.stack([jnp.mean(_tap(xp, i, j, module.strides, out_hw), axis=(0, 1, 2))
                       for i in range(kh) for j in range(kw)]).reshape(kh, kw, x.shape[-1])
    n = x.shape[0] * out_hw[0] * out_hw[1]
  else:
    batch = jnp.mean(x.reshape(-1, x.shape[-1]), axis=0)
    n = x.size // x.shape[-1]
  mean = module.variable(STATS, INPUT_MEAN, lambda: jnp.zeros(batch.shape, jnp.float32))
  count = module.variable(STATS, INPUT_COUNT, lambda: jnp.zeros((), jnp.float32))
  total = count.value + n
  mean.value = mean.value + (batch - mean.value) * (n / total)
  count.value = total


def mean_output(delta: jax.Array, input_mean: jax.Array, groups: int = 1) -> jax.Array:
  """``E[layer(x; delta)]`` per output channel from the mean input patch (a convolution and a matrix product are
  linear in their kernel): ``sum_{i,j,c} delta[i,j,c,o] E[x][i,j,c]`` over the input channels of ``o``'s group,
  ``E[x] @ delta`` for a dense layer."""
  if delta.ndim == 2:
    return jnp.dot(input_mean, delta, precision=lax.Precision.HIGHEST)
  kh, kw, per_group, cout = delta.shape
  m = input_mean.reshape(kh, kw, groups, per_group)
  d = delta.reshape(kh, kw, per_group, groups, cout // groups)
  return jnp.einsum("ijgc,ijcgo->go", m, d, precision=lax.Precision.HIGHEST).reshape(cout)


def bias_offsets(thresholds) -> dict[tuple[str, ...], jax.Array]:
  """The learned bias offsets of a ``quant`` tree, by layer path."""
  flat = traverse_util.flatten_dict(thresholds)
  return {path[:-1]: value for path, value in flat.items() if path[-1] == BIAS_OFFSET}


def fold_biases(model: nn.Module, variables: dict, sample: jax.Array) -> dict:
  """``variables`` with each layer's bias as applied (learned offset and tracked bias correction included, see
  :func:`layer_bias`) in ``params``, and the offsets and the mean input patches removed: the same model (in float
  arithmetic), in the form that checkpoints, export and other tools read. ``sample``: any input batch (one image
  will do). Without offsets or tracked corrections, ``variables`` unchanged."""
  thresholds = traverse_util.flatten_dict(dict(variables.get(THRESHOLDS, {})))
  stats = traverse_util.flatten_dict(dict(variables.get(STATS, {})))
  folded = (BIAS_OFFSET,) if any(p[-1] == BIAS_OFFSET for p in thresholds) else ()
  folded += (INPUT_MEAN, INPUT_COUNT) if any(p[-1] == INPUT_MEAN for p in stats) else ()
  if not folded:
    return variables
  _, state = model.apply(variables, sample, mutable=[BIASES])
  params = traverse_util.flatten_dict(variables["params"])
  params.update(traverse_util.flatten_dict(dict(state[BIASES])))

  def kept(flat):
    rest = {p: v for p, v in flat.items() if p[-1] not in folded}
    return traverse_util.unflatten_dict(rest) if rest else {}

  return {**variables, "params": traverse_util.unflatten_dict(params), THRESHOLDS: kept(thresholds),
          **({STATS: kept(stats)} if STATS in variables else {})}


class QConv(nn.Module):
  """Conv (+ bias) + activation with quantization points ``kernel`` and ``output`` (after the activation, which is
  where TFLite's fused kernels quantize; ReLU6's clip coincides with the unsigned quantizer's).

  ``groups = input channels`` makes a depthwise convolution (kernel HW1C).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Any = "SAME"
  groups: int = 1
  use_bias: bool = True
  activation: str = "none"
  quant: QuantConfig | None = None
  impl: str = "lax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    if cin % self.groups:
      raise ValueError(f"{point_name(self, '')}: {cin} input channels do not divide into {self.groups} groups")
    float_kernel = self.param("kernel", nn.initializers.lecun_normal(),
                              (*self.kernel_size, cin // self.groups, self.features))
    quantizer = quantizer_for(self, self.quant, "kernel")
    # a fast depthwise layer takes its kernel linearized in the FAT factors: their gradient without the kernel's
    linearize = is_fast_depthwise(cin, float_kernel.shape, self.groups, self.impl)
    kernel = float_kernel if quantizer is None else quantizer(float_kernel, linearize=linearize)
    bias = layer_bias(self, x, float_kernel, quantizer) if self.use_bias else None
    intrinsic = _intrinsic_spec(self)
    if intrinsic is not None:  # fixed point quantized after every multiply / add (fatq.workbench.quantizers)
      from fatq.workbench import quantizers as extra
      if self.groups != 1:
        raise NotImplementedError(f"{point_name(self, 'output')}: intrinsic fixed point supports groups=1 only")
      pads = _pads(x.shape[1:3], self.kernel_size, self.strides, self.padding)
      y = extra.intrinsic_conv(x, kernel, bias, self.strides, pads, intrinsic, extra.intrinsic_key(self, x, intrinsic))
    else:
      y = _integer_layer(self, x, kernel, bias, lambda a, b: conv2d(a, b, self.strides, self.padding, self.groups,
                                                                    self.impl), self.activation)
      if y is not None:
        return y
      y = conv2d(x, kernel, self.strides, self.padding, self.groups, self.impl)
      if bias is not None:
        y = y + bias
    if self.activation == "relu6" and self.has_variable("params", RELU6_BOUND):
      # ReLU6 whose bound differs per channel: what cross-layer equalization leaves (fatq.equalize), exactly
      # relu6(s * y) / s = clip(y, 0, 6 / s)
      y = jnp.clip(y, 0.0, self.get_variable("params", RELU6_BOUND))
    else:
      y = ACTIVATIONS[self.activation](y)
    return quant_point(self, self.quant, "output", y)


class QDense(nn.Module):
  """Dense (+ bias) + activation with quantization points ``kernel`` and ``output``."""

  features: int
  use_bias: bool = True
  activation: str = "none"
  quant: QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    float_kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    quantizer = quantizer_for(self, self.quant, "kernel")
    kernel = float_kernel if quantizer is None else quantizer(float_kernel)
    bias = layer_bias(self, x, float_kernel, quantizer) if self.use_bias else None
    intrinsic = _intrinsic_spec(self)
    if intrinsic is not None:  # fixed point quantized after every multiply / add (fatq.workbench.quantizers)
      from fatq.workbench import quantizers as extra
      flat = x.reshape(-1, x.shape[-1])
      y = extra.intrinsic_matmul(flat, kernel, bias, intrinsic.bits, intrinsic.frac_bits, intrinsic.rounding,
                                 extra.intrinsic_key(self, x, intrinsic)).reshape(*x.shape[:-1], self.features)
    else:
      y = _integer_layer(self, x, kernel, bias, lambda a, b: a @ b, self.activation)
      if y is not None:
        return y
      y = x @ kernel
      if bias is not None:
        y = y + bias
    y = ACTIVATIONS[self.activation](y)
    return quant_point(self, self.quant, "output", y)
