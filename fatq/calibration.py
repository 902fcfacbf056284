"""Calibration (statistics of every quantization point) and initial FAT thresholds."""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fatq.config import QuantConfig, QuantRule, QuantSpec
from fatq.layers import RANGES, SEARCH, STATS, THRESHOLDS

Tree = Any


def calibrate(model, params: Tree, batches: Iterable[np.ndarray]) -> Tree:
  """Running min/max of every quantization point over ``batches`` (unlabeled images), as the ``quant_stats`` tree.

  Weights are recorded too (their statistics are those of the frozen tensor); activations over all batches. Points
  calibrated with ``'mse'``, ``'percentile'`` or ``'entropy'``: a kernel's range is searched on the first batch (it is
  the same on every batch); an activation's range is chosen afterwards from its min/max and what a second pass over
  all batches sums (:func:`clip_activation_ranges`): ``alpha* (min, max)`` with ``alpha*`` of least squared
  quantization error or of least divergence from the values' histogram, or the range that keeps the spec's
  percentile of the values.
  """
  batches = [b for b in batches if len(b)]  # read twice where a second pass searches activation ranges

  # params are arguments, not closed-over constants: XLA would otherwise constant-fold every weight statistic
  @jax.jit
  def first(params, x):
    return model.apply({"params": params}, x, mutable=[STATS])[1][STATS]

  @jax.jit
  def update(params, stats, x):
    return model.apply({"params": params, STATS: stats}, x, mutable=[STATS])[1][STATS]

  stats = None
  for x in batches:
    stats = first(params, x) if stats is None else update(params, stats, x)
  if stats is None:
    raise ValueError("calibration got no images: the calibration set is empty")
  _check_finite(stats)
  return clip_activation_ranges(model, params, stats, batches)


def clip_activation_ranges(model, params: Tree, stats: Tree, batches: Sequence[np.ndarray]) -> Tree:
  """``stats`` with the range of each activation point calibrated by a search (``'mse'``, ...) chosen by its
  quantizer from what it sums over ``batches`` (for ``'mse'``: the min/max range scaled by the candidate of
  :data:`fatq.layers.CLIP_FACTORS`, 1.0 first and kept on ties, of least ``sum (Q_a(x) - x)^2``), per slice;
  ``stats`` itself where there is none (found by tracing, without running)."""

  def search(params, stats, errors, x):
    variables = {"params": params, STATS: stats, **({SEARCH: errors} if errors is not None else {})}
    return model.apply(variables, x, mutable=[SEARCH])[1].get(SEARCH, {})

  shapes = jax.eval_shape(search, params, stats, None, batches[0])
  if not jax.tree.leaves(shapes):
    return stats
  accumulate = jax.jit(search)
  found = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  for x in batches:
    found = accumulate(params, stats, found, x)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(stats))
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(found)).items():
    if path[-1] in ("min", "max"):  # the range each quantizer chose from all the batches
      flat[path] = value
  stats = flax.traverse_util.unflatten_dict(flat)
  _check_finite(stats)
  return stats


def _check_finite(stats: Tree) -> None:
  bad = [name for name, s in points(stats).items() if not all(np.all(np.isfinite(v)) for v in s.values())]
  if bad:
    raise ValueError(f"calibration statistics are not finite at {bad[:5]}: the model produced NaN/Inf on the "
                     "calibration images (check the weights and the input preprocessing)")


def init_thresholds(model, params: Tree, stats: Tree, sample: np.ndarray) -> Tree:
  """The trainable FAT factors at their initial values (scale 1, shift 0): the ``quant`` tree. Empty if none."""

  # jitted: run op by op, the model's apply compiles hundreds of small programs (~20 s for MobileNet v2)
  @jax.jit
  def create(params, stats, sample):
    return model.apply({"params": params, STATS: stats}, sample, mutable=[THRESHOLDS])[1].get(THRESHOLDS, {})

  return create(params, stats, sample)


def quant_ranges(model, variables: Tree, sample: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
  """Each point's final range and TFLite parameters (lo, hi, scale, zero_point, qmin, qmax, bits), by name, in the
  order the model applies its points (the network's)."""
  return quant_ranges_of_each(model, [variables], sample)[0]


def quant_ranges_of_each(model, variable_sets: Sequence[Tree],
                         sample: np.ndarray) -> list[dict[str, dict[str, np.ndarray]]]:
  """:func:`quant_ranges` of each of ``variable_sets`` (the same model's), computed by one compiled program. Applied op
  by op instead, the first call in a process compiled each small op anew: 40-48 s for MobileNet v2 or MnasNet 1.0,
  against 10 s to compile the whole model once. The program is kept for later calls with an equal model."""
  try:
    ranges, order = _ranges_program(model)
  except TypeError:  # a field that is not hashable (a list, ...): compiled for this call alone
    ranges, order = _ranges_program.__wrapped__(model)
  computed = ranges(list(variable_sets), sample)
  return [{name: {k: np.asarray(v) for k, v in found[name].items()} for name in order} for found in computed]


@functools.lru_cache(maxsize=4)  # a few programs kept: each holds a compiled model
def _ranges_program(model) -> tuple[Any, list[str]]:
  """The jitted ``(variable sets, sample) -> each set's ranges`` of ``model`` (a module is hashable by its fields), and
  the names of its points in the order the model applies them, filled in when it is first traced."""
  order = []

  def ranges(sets, x):
    found = [points(model.apply(v, x, mutable=[RANGES])[1][RANGES]) for v in sets]
    order[:] = found[0]  # while tracing: the order the model applies its points (the result's dicts come back sorted)
    return found

  return jax.jit(ranges), order


def points(tree: Tree) -> dict[str, Any]:
  """Flatten a ``quant_stats`` / ``quant`` / ``quant_ranges`` tree to ``{point name: {leaf: value}}``.

  ``{'conv1': {'kernel_quant': {'min': ...}}}`` -> ``{'conv1/kernel': {'min': ...}}``.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  out: dict[str, dict[str, Any]] = {}
  for path, value in flat.items():
    *module, quantizer, leaf = path
    name = "/".join((*module, quantizer.removesuffix("_quant")))
    out.setdefault(name, {})[leaf] = value
  return out


def point_names(model, sample: np.ndarray) -> list[str]:
  """Every quantization point of ``model``, whether its rules quantize it or leave it in float (the names that
  :meth:`fatq.config.QuantConfig.check_matches` takes): traced with a rule that quantizes everything, no compute."""
  probe = model.clone(quant=QuantConfig((QuantRule(".*", QuantSpec(trainable=False)),)))
  shapes = jax.eval_shape(lambda x: probe.init(jax.random.key(0), x), jax.ShapeDtypeStruct(np.shape(sample),
                                                                                           jnp.float32))
  return list(points(shapes.get(STATS, {})))


def count(tree: Tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def finite(tree: Tree) -> jax.Array:
  """True when every leaf is finite (used to catch a threshold that became NaN/Inf)."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)
