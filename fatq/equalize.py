"""Data-free quantization (Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"): cross-layer equalization of the float weights, and bias correction after quantizing them.

Why: in scalar ("per-tensor") mode one range serves every channel of a kernel. Depthwise kernels of MobileNets have
channel ranges that differ by orders of magnitude, so the small channels get a handful of grid steps (or none).
Learned thresholds can only move the one range; equalization makes the channels alike first.

Cross-layer equalization (CLE, paper section 4.1). For two consecutive layers ``A -> f -> B`` where ``B`` reads
``A``'s output channels alone and ``f`` is positive-homogeneous (ReLU, identity, max / average pooling), dividing
output channel ``i`` of ``A`` (kernel and bias) by ``s_i > 0`` and multiplying input channel ``i`` of ``B`` by
``s_i`` leaves the float function unchanged: ``f(y / s) = f(y) / s``. The paper's choice
``s_i = sqrt(r1_i / r2_i)`` (``r1_i``: range of ``A``'s output channel ``i``, ``r2_i``: range of ``B``'s input
channel ``i``; here ranges are ``max |w|``, as for a symmetric quantizer) gives both channels the range
``sqrt(r1_i * r2_i)``; a layer in a chain is ``B`` of one pair and ``A`` of the next, so the pairs are swept until
the scales stop changing. Channels that carry nothing (dead on one side: a folded batch norm with gamma ~0, an int8
weight rounded to zero) make that formula 0/0 or infinite; :func:`scales` gives them a range that does not set
their layer's per-tensor range. Without that, MobileNet v2's equalized weights stayed unusable at 8 bits per tensor.

ReLU6 is not positive-homogeneous (``relu6(y / s) != relu6(y) / s`` once ``y > 6``), but it is with its bound
rescaled too: ``min(relu(y / s), 6 / s) = relu6(y) / s``. A pair whose ``A`` ends in ReLU6 therefore gets a
per-channel bound (the ``params`` leaf ``relu6_bound`` of ``A``, which :class:`fatq.layers.QConv` applies instead
of 6), divided by ``s`` like the bias: the float function stays exact. TFLite's fused ReLU6 clips every channel at
6, so such a model does not export; the paper's MobileNetV2 practice (and AIMET's) is the alternative: run the model
with ReLU instead of ReLU6 (the models' field ``relu6_clip=False``, the experiment's ``equalize='relu'``), which
changes the float function (measured by the experiment's ``-cle-relu`` rows as ``equalized_float``), then equalize.

Which layers are pairs (:func:`pairs`): consecutive conv / dense layers in execution order whose shapes chain (``B``
has as many input channels as ``A`` has outputs, so a flatten to a dense layer is excluded), neither a grouped (not
depthwise) convolution, whose ``A`` ends in ReLU, no activation, or ReLU6 (a conv layer: dense layers have no
per-channel bound), and where no residual add (the quantization point ``<block>/add`` of fatq's models) reads
the tensor between them. This assumes what every fatq model is: a chain of layers with per-channel pooling and
residual adds in between, no branches or concatenations; :func:`equalize` compares the float outputs before and
after on random images and refuses a model where that assumption fails.

Bias correction (paper section 4.2, the *empirical* variant, per layer): quantizing a kernel from ``W`` to ``W_q``
shifts the mean pre-activation output of channel ``o`` by ``E[(W_q - W) * x]_o``; it is measured on the float
model's input to the layer over calibration images (zero-padded borders included, every layer on float inputs, so
upstream quantization errors are not compensated) and subtracted from the bias. The paper's data-free variant
needs the batch-norm statistics, which are gone once batch norm is folded at load time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fatq import calibration
from fatq.config import QuantConfig, QuantRule, QuantSpec
from fatq.layers import RELU6_BOUND, STATS, FakeQuant, QConv, QDense, conv2d

Tree = Any

# Activations f with f(y / s) = f(y) / s for s > 0 (ReLU6 with its bound divided by s as well).
HOMOGENEOUS = ("relu", "none", "relu6")


@dataclasses.dataclass(frozen=True)
class Layer:
  """A conv / dense layer as called: ``kind`` is 'conv', 'depthwise', 'grouped' or 'dense'; ``block`` is the path
  of the module that created it ('' at the top level)."""

  path: str
  kind: str
  activation: str
  block: str


@dataclasses.dataclass(frozen=True)
class Pair:
  """``a`` -> ``b``: output channels of ``a`` (whose activation is ``a_activation``) are input channels of ``b``
  (of kind ``b_kind``)."""

  a: str
  b: str
  b_kind: str
  a_activation: str = "none"


def layer_calls(model, params: Tree, input_shape: tuple[int, ...]) -> list[Layer]:
  """The QConv / QDense layers of ``model`` in execution order (pytree dicts are key-sorted: block10 before
  block2, so only a traced call gives the order)."""
  out: list[Layer] = []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (QConv, QDense)):
      path = "/".join(m.path)
      if all(layer.path != path for layer in out):
        if isinstance(m, QDense):
          kind = "dense"
        else:
          cin = args[0].shape[-1]
          kind = "conv" if m.groups == 1 else ("depthwise" if m.groups == cin == m.features else "grouped")
        out.append(Layer(path, kind, m.activation, "/".join(m.path[:-1])))
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
  return out


def residual_blocks(model, input_shape: tuple[int, ...]) -> set[str]:
  """Paths of the blocks that add their input to their output: the model's own quantization points
  ``<block>/add`` say where the adds are (the rule lives in the model, not here)."""
  if not hasattr(model, "quant"):
    return set()
  probe = model.clone(quant=QuantConfig((QuantRule(r"(.*/)?add", QuantSpec(trainable=False)),
                                         QuantRule(r".*", None))))
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: probe.init(jax.random.key(0), x), x)
  return {name.rpartition("/")[0] for name in calibration.points(shapes.get(STATS, {}))}


def _channels(kernel_shape, kind: str, side: str) -> int:
  """Output channels (side 'out') or input channels (side 'in', counting all groups) of a kernel."""
  if side == "out" or kind == "depthwise":
    return kernel_shape[-1]
  return kernel_shape[0] if kind == "dense" else kernel_shape[2]


def pairs(model, params: Tree, input_shape: tuple[int, ...]) -> tuple[list[Pair], list[tuple[str, str, str]]]:
  """``(pairs, skipped)``: the layer pairs CLE may rescale and the consecutive ones it may not, as
  ``(a, b, why)`` (see the module docstring for the rule)."""
  flat = _layer_params(params)
  calls = layer_calls(model, params, input_shape)
  adds = residual_blocks(model, input_shape)
  found, skipped = [], []
  for a, b in zip(calls, calls[1:]):
    why = None
    if a.kind == "grouped" or b.kind == "grouped":
      why = "grouped convolution"
    elif _channels(flat[a.path]["kernel"].shape, a.kind, "out") != _channels(flat[b.path]["kernel"].shape, b.kind, "in"):
      why = "channels do not chain (e.g. a flatten)"
    elif a.block != b.block and (a.block in adds or b.block in adds):
      why = "a residual add reads the tensor between them"
    elif a.activation not in HOMOGENEOUS:
      why = f"{a.activation} is not positive-homogeneous"
    elif a.activation == "relu6" and a.kind == "dense":
      why = "a dense layer has no per-channel ReLU6 bound"
    if why:
      skipped.append((a.path, b.path, why))
    else:
      found.append(Pair(a.path, b.path, b.kind, a.activation))
  return found, skipped


def _layer_params(params: Tree) -> dict[str, dict]:
  """``{layer path: {'kernel': ..., 'bias': ...}}``."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  out: dict[str, dict] = {}
  for name, value in flat.items():
    path, _, leaf = name.rpartition("/")
    out.setdefault(path, {})[leaf] = value
  return out


def _set_layer_params(params: Tree, layers: dict[str, dict]) -> Tree:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  for path, leaves in layers.items():
    for leaf, value in leaves.items():
      flat[f"{path}/{leaf}"] = value
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _in_axis(kind: str) -> int:
  """Axis of a kernel of ``kind`` that indexes its input channels (HWIO conv: I; depthwise HW1C: C; dense IO: I)."""
  return {"conv": 2, "depthwise": 3, "dense": 0}[kind]


def channel_ranges(kernel: np.ndarray, axis: int) -> np.ndarray:
  """``max |w|`` of each slice of ``kernel`` along ``axis``."""
  k = np.moveaxis(np.abs(np.asarray(kernel)), axis, -1)
  return k.reshape(-1, k.shape[-1]).max(axis=0)


def scales(r1: np.ndarray, r2: np.ndarray, bias: np.ndarray | None, activation: str,
           dead: float = 1e-6) -> np.ndarray:
  """The scales ``s`` of one pair from the channel ranges ``r1`` (A's outputs) and ``r2`` (B's inputs): the paper's
  ``sqrt(r1 / r2)``, except for channels that carry nothing, where that formula is 0/0, 0 or infinite. A channel
  is dead on a side when its range is at most ``dead`` times that side's largest (zero but for rounding: a folded
  batch norm with gamma ~0, or a weight rounded to zero in an int8 checkpoint).

  * B ignores channel i (dead in B): A's channel i may be scaled freely. If its range is above the median of A's
    channels live on both sides, it is brought down to that median, so that a large meaningless range (seen: 34 against
    ~0.5 in MobileNet v2's block2/depthwise) no longer sets A's per-tensor range. Never up (s >= 1): scaling up a
    channel whose output is mostly its bias would scale up that bias too, and A's activation range with it (seen: 1e5 in
    MobileNet v1's block6/depthwise).
  * A's channel i is dead and outputs exactly 0 (ReLU with bias <= 0, or no activation and bias 0): B's weights
    for it multiply zeros, so B's channel i gets the median range of B's channels live on both sides, for the
    same reason.
  * A's channel i is dead but outputs a non-zero constant act(bias): ``s = 1``. A scale ~ sqrt(1e-12 / r2) would
    multiply that constant by ~1e6 and wreck A's activation range.
  """
  live1, live2 = r1 > dead * r1.max(), r2 > dead * r2.max()
  both = live1 & live2
  s = np.ones_like(r1)
  s[both] = np.sqrt(r1[both] / r2[both])
  if both.any():
    ignored = live1 & ~live2
    s[ignored] = np.maximum(r1[ignored] / np.median(r1[both]), 1.0)
    b = np.zeros_like(r1) if bias is None else np.asarray(bias, np.float64)
    zero = (b <= 0) if activation in ("relu", "relu6") else (b == 0)
    silent = ~live1 & zero & live2
    s[silent] = np.median(r2[both]) / r2[silent]
  return s


def equalize(model, params: Tree, input_shape: tuple[int, ...], *, max_sweeps: int = 100, tol: float = 1e-6,
             dead: float = 1e-6) -> tuple[Tree, dict]:
  """Cross-layer equalization of ``params`` (the float function of ``model`` is unchanged; see the module
  docstring). Sweeps all pairs until every scale of a sweep is within ``tol`` of 1 (or ``max_sweeps``).
  ``input_shape``: one image's shape (to trace the model); ``dead``: see :func:`scales`.

  Returns ``(params, report)``; the report has the pairs, the skipped pairs with the reason, the number of sweeps,
  the last sweep's largest ``|s - 1|`` and, per rescaled kernel, the max/median ratio of its output-channel ranges
  before and after (:func:`_spread`). Raises ValueError when the model has no pair to rescale."""
  found, skipped = pairs(model, params, input_shape)
  if not found:
    reasons = "; ".join(f"{a} -> {b}: {why}" for a, b, why in skipped[:4])
    raise ValueError(f"cross-layer equalization: {type(model).__name__} has no pair of layers it can rescale"
                     + (f" ({reasons})" if reasons else ""))
  original = _layer_params(params)
  # float64 while sweeping: a chain is rescaled a hundred times; one rounding to float32 at the end
  work = {p: {k: np.asarray(v, np.float64) for k, v in original[p].items()} for pr in found for p in (pr.a, pr.b)}
  for pr in found:
    if pr.a_activation == "relu6" and RELU6_BOUND not in work[pr.a]:
      work[pr.a][RELU6_BOUND] = np.full(work[pr.a]["kernel"].shape[-1], 6.0)
  spread_before = {p: _spread(work[p]["kernel"]) for p in work}
  sweeps, change = 0, np.inf
  while sweeps < max_sweeps and change > tol:
    sweeps += 1
    change = 0.0
    for pr in found:
      a, b, axis = work[pr.a], work[pr.b], _in_axis(pr.b_kind)
      s = scales(channel_ranges(a["kernel"], -1), channel_ranges(b["kernel"], axis), a.get("bias"),
                 pr.a_activation, dead)
      a["kernel"] = a["kernel"] / s
      for leaf in ("bias", RELU6_BOUND):
        if leaf in a:
          a[leaf] = a[leaf] / s
      shape = [1] * b["kernel"].ndim
      shape[axis] = -1
      b["kernel"] = b["kernel"] * s.reshape(shape)
      change = max(change, float(np.max(np.abs(s - 1.0))))
  new = {p: {k: v.astype(np.float32 if k == RELU6_BOUND else np.asarray(original[p][k]).dtype)
             for k, v in leaves.items()} for p, leaves in work.items()}
  equalized = _set_layer_params(params, new)
  report = dict(pairs=[(p.a, p.b) for p in found], skipped=skipped, sweeps=sweeps, last_change=change,
                spread={p: (spread_before[p], _spread(work[p]["kernel"])) for p in work},
                float_change=_check_same_function(model, params, equalized, input_shape))
  return equalized, report


def _check_same_function(model, params: Tree, equalized: Tree, input_shape: tuple[int, ...],
                         tolerance: float = 1e-3) -> float:
  """``max |f'(x) - f(x)| / max |f(x)|`` on two random images; raises where it exceeds ``tolerance``: a structure
  :func:`pairs` cannot see (a residual written as a plain ``+``, a branch) was rescaled across. Float rounding alone
  gives ~1e-6."""
  probe = jax.random.normal(jax.random.key(0), (2, *input_shape), jnp.float32)
  run = jax.jit(lambda p: model.apply({"params": p}, probe))
  before, after = np.asarray(run(params), np.float64), np.asarray(run(equalized), np.float64)
  change = float(np.max(np.abs(after - before)) / max(np.max(np.abs(before)), 1e-30))
  if not np.isfinite(change) or change > tolerance:
    raise ValueError(f"cross-layer equalization changed {type(model).__name__}'s float outputs by {change:.3g} of "
                     f"their largest (more than {tolerance:g}): the model likely adds or branches in a way the pairs "
                     "cannot see (CLE assumes a chain whose residual adds are '<block>/add' quantization points, "
                     "as fatq's models have); leave equalization off for it")
  return change


def _spread(kernel: np.ndarray) -> float:
  """max / median of a kernel's output-channel ranges: how many times fewer grid steps the typical channel gets
  than the widest one under one per-tensor range. (Not max / min: dead channels, ~1e-12 in the shared Keras
  MobileNet, would make every kernel look hopeless.)"""
  r = channel_ranges(kernel, -1)
  med = float(np.median(r))
  return float(r.max()) / med if med > 0 else float("inf")


# ---------------------------------------------------------------------------------------------------------------------
# Bias correction.


def weight_only(qmodel):
  """``qmodel`` with its kernels quantized as configured and every other point (activations, input) in float."""
  if getattr(qmodel, "quant", None) is None:
    raise ValueError(f"bias correction needs the quantized model (its quant rules say how each kernel is rounded); "
                     f"{type(qmodel).__name__} was given with quant=None")
  return qmodel.clone(quant=QuantConfig((QuantRule(r"(?!.*kernel$).*", None),) + tuple(qmodel.quant.rules)))


def quantized_kernels(qmodel, params: Tree, sample: np.ndarray) -> dict[str, np.ndarray]:
  """``{layer path: W_q}``: each kernel as ``qmodel`` fake-quantizes it after calibration (post-training ranges)."""
  wq = weight_only(qmodel)
  stats = calibration.calibrate(wq, params, [sample])  # kernel statistics do not depend on the images
  capture = jax.jit(lambda v, x: wq.apply(v, x, capture_intermediates=lambda m, method: isinstance(m, FakeQuant)
                                          and method == "__call__")[1])
  state = capture({"params": params, STATS: stats}, sample)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]))
  return {"/".join(k[:-2]): np.asarray(v[0]) for k, v in flat.items() if k[-2] == "kernel_quant"}


def output_shift(model, params: Tree, deltas: dict[str, np.ndarray], batches: Iterable[np.ndarray]) -> dict:
  """``{layer path: E[layer(x; delta)]}`` per output channel, without bias or activation, where ``x`` is the
  layer's input in the float ``model`` and the mean runs over images and positions: the mean change of the
  pre-activation output when the kernel changes by ``delta`` (the convolution is linear in its kernel)."""
  sums = _shift_sums(model)
  total, count = {}, {}
  for x in batches:
    s, n = sums(params, deltas, x)
    for p in s:
      total[p] = total.get(p, 0.0) + np.asarray(s[p], np.float64)
      count[p] = count.get(p, 0) + int(n[p])
  return {p: total[p] / count[p] for p in total}


@functools.lru_cache(maxsize=8)
def _shift_sums(model):
  """Jitted ``(params, deltas, x) -> ({layer: sum of layer(x; delta) over images and positions}, {layer: count})``,
  one per model (modules are hashable), so that repeated calls do not compile again."""

  @jax.jit
  def sums(params, deltas, x):
    out = {}

    def record(next_fun, args, kwargs, context):
      m = context.module
      path = "/".join(m.path)
      if context.method_name == "__call__" and path in deltas and isinstance(m, (QConv, QDense)):
        x = args[0]
        d = deltas[path]
        y = x @ d if isinstance(m, QDense) else conv2d(x, d, m.strides, m.padding, m.groups, m.impl)
        y = y.reshape(-1, y.shape[-1])
        out[path] = (jnp.sum(y, axis=0, dtype=jnp.float32), y.shape[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply({"params": params}, x)
    return {p: s for p, (s, _) in out.items()}, {p: n for p, (_, n) in out.items()}

  return sums


def correct_bias(qmodel, params: Tree, batches: Iterable[np.ndarray]) -> tuple[Tree, dict]:
  """Empirical bias correction for the kernels as ``qmodel`` quantizes them: ``bias -= E[(W_q - W) x]`` per layer
  (see the module docstring). ``batches``: calibration images (their first image also calibrates the kernels,
  whose statistics do not depend on images). Returns ``(params, {layer: max |correction|})``; layers without a
  bias are left alone."""
  batches = [b for b in batches if len(b)]  # an empty batch adds nothing to the means
  if not batches:
    raise ValueError("bias correction got no images: the calibration set is empty")
  flat = _layer_params(params)
  wq = quantized_kernels(qmodel, params, batches[0][:1])
  deltas = {p: w - np.asarray(flat[p]["kernel"]) for p, w in wq.items() if "bias" in flat[p]}
  shift = output_shift(qmodel.clone(quant=None), params, deltas, batches)
  new = {p: {"bias": (np.asarray(flat[p]["bias"], np.float64) - shift[p]).astype(np.asarray(flat[p]["bias"]).dtype)}
         for p in shift}
  return _set_layer_params(params, new), {p: float(np.max(np.abs(s))) for p, s in shift.items()}
