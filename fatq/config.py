"""What to quantize and how: specs per tensor, chosen by rules on tensor names.

Every quantization point in a fatq model has a name: the module path plus the tensor's role, e.g. ``conv1/kernel``,
``conv1/output``, ``block3/add``, ``input``. A :class:`QuantConfig` is an ordered list of :class:`QuantRule`; the
first rule whose regular expression matches the whole name gives the point's :class:`QuantSpec` (``None``: leave it
in float). The model definition never changes; the same module runs as float teacher, in calibration, or quantized.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

# Bounds of the FAT scale factors (paper, SPEC §1) and of the public reference code (SPEC §2).
PAPER_BOUNDS = dict(scale_bounds=(0.5, 1.0), signed_shift_bounds=(-0.2, 0.4), unsigned_shift_bounds=(0.0, 0.4))
KINDS = ("uniform", "pot", "fixed_point", "lsq")
CALIBRATIONS = ("minmax", "mse", "percentile", "entropy")
# The reference code gives a tensor whose calibrated minimum is 0 (a ReLU output) one factor, its width: no shift.
REFERENCE_BOUNDS = dict(scale_bounds=(0.5, 1.3), signed_shift_bounds=(-0.2, 0.4), unsigned_shift_bounds=(0.0, 0.0))


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one tensor is quantized.

  Attributes:
    bits: grid size, 2..16.
    symmetric: symmetric thresholds ``[-T, T]`` (or ``[0, T]`` when unsigned), else asymmetric ``[T_l, T_r]``.
    per_channel: one range per slice along ``channel_axis`` ("vector" mode) instead of one per tensor ("scalar").
    channel_axis: the output-channel axis (the last axis of fatq's HWIO / HW1C / IO kernels).
    signed: ``None`` decides from calibration (a tensor whose calibrated minimum is >= 0 is unsigned).
    trainable: FAT scale factors are learned; ``False`` keeps the calibrated range (post-training quantization).
    scale_bounds: bounds of the symmetric ``alpha`` and of the asymmetric width factor ``alpha_R``.
    signed_shift_bounds, unsigned_shift_bounds: bounds of the asymmetric left-limit shift ``alpha_T``.
    kind: the quantizer (see ``fatq.workbench.quantizers``): ``'uniform'`` (FAT / TF fake quant, the default),
      ``'pot'`` (power-of-two: ``bits`` = 1 sign bit + exponent code), ``'fixed_point'`` (``bits`` = word width W,
      ``frac_bits`` = F), ``'lsq'`` (learned step size, trainable ``step`` in the ``quant`` collection).
    frac_bits: fixed point only: fractional bits F (grid ``2^-F``, range ``[-2^(W-1), 2^(W-1)-1] * 2^-F``).
    rounding: fixed point only: ``'nearest'`` or ``'stochastic'``.
    placement: fixed point on a layer's ``output`` point only: ``'extrinsic'`` quantizes the layer output,
      ``'intrinsic'`` quantizes every product and every partial sum inside the layer (TensorQuant).
    calibration: how the range ``[T_l, T_r]`` (the FAT factors' reference) is calibrated: ``'minmax'``, the values'
      range, or ``'mse'`` (uniform grids): that range scaled by the factor ``alpha*`` in ``[0.2, 1]`` (step 0.01) of
      least squared error ``sum (Q(x) - x)^2``, per channel where ``per_channel``; for a kernel on the kernel, for
      an activation summed over the calibration images (a second pass over them). At 4 bits a range clipped to
      ``alpha* < 1`` trades a few clipped outliers for a finer grid everywhere else. ``'percentile'`` (uniform
      grids): the range that keeps ``percentile`` % of the values, from their histogram (2048 bins over the min/max
      range, on the same tensors as ``'mse'``): ``[-T, T]`` with ``T`` the percentile of ``|x|`` for symmetric grids,
      a tail of ``(100 - percentile) / 2`` % clipped on each side for asymmetric ones. ``'entropy'`` (uniform grids,
      TensorRT's calibration): the min/max range scaled by the factor of ``'mse'``'s candidates whose clipped and
      quantized histogram is closest to the values' (least Kullback-Leibler divergence;
      :func:`fatq.quantizers.entropy_divergences`).
    percentile: the share of values, in %, that ``calibration='percentile'`` keeps in range (0 < p <= 100).
  """

  bits: int = 8
  symmetric: bool = True
  per_channel: bool = False
  channel_axis: int = -1
  signed: bool | None = None
  trainable: bool = True
  scale_bounds: tuple[float, float] = PAPER_BOUNDS["scale_bounds"]
  signed_shift_bounds: tuple[float, float] = PAPER_BOUNDS["signed_shift_bounds"]
  unsigned_shift_bounds: tuple[float, float] = PAPER_BOUNDS["unsigned_shift_bounds"]
  kind: str = "uniform"
  frac_bits: int = 0
  rounding: str = "nearest"
  placement: str = "extrinsic"
  calibration: str = "minmax"
  percentile: float = 99.99

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"QuantSpec.kind must be one of {KINDS}, got {self.kind!r}")
    max_bits = 32 if self.kind == "fixed_point" else 16
    if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= max_bits:
      raise ValueError(f"QuantSpec.bits must be an integer in 2..{max_bits}, got {self.bits!r}")
    if self.rounding not in ("nearest", "stochastic"):
      raise ValueError(f"QuantSpec.rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
    if self.placement not in ("extrinsic", "intrinsic"):
      raise ValueError(f"QuantSpec.placement must be 'extrinsic' or 'intrinsic', got {self.placement!r}")
    if self.kind != "fixed_point" and (self.rounding != "nearest" or self.placement != "extrinsic"):
      raise ValueError("QuantSpec.rounding / placement apply to kind='fixed_point' only")
    if self.calibration not in CALIBRATIONS:
      raise ValueError(f"QuantSpec.calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
    if self.calibration != "minmax" and self.kind != "uniform":
      raise ValueError(f"QuantSpec.calibration={self.calibration!r} searches a uniform grid's range; "
                       f"kind={self.kind!r} has its own (use calibration='minmax')")
    if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
      raise ValueError(f"QuantSpec.percentile is the share of values kept in range, in % (0 < p <= 100), got "
                       f"{self.percentile!r}")
    for name in ("symmetric", "per_channel", "trainable"):
      if not isinstance(getattr(self, name), bool):  # "false" would be truthy
        raise ValueError(f"QuantSpec.{name} must be True or False, got {getattr(self, name)!r}")
    if not (self.signed is None or isinstance(self.signed, bool)):
      raise ValueError(f"QuantSpec.signed must be None (decided by calibration), True or False, got {self.signed!r}")
    if not isinstance(self.channel_axis, int) or isinstance(self.channel_axis, bool):
      raise ValueError(f"QuantSpec.channel_axis must be an integer axis, got {self.channel_axis!r}")
    # Each factor starts at its calibrated value (1 for scales and widths, 0 for shifts): bounds that leave it out
    # would clip it from the start, where it gets no gradient.
    for name, start in (("scale_bounds", 1.0), ("signed_shift_bounds", 0.0), ("unsigned_shift_bounds", 0.0)):
      lo, hi = getattr(self, name)
      if not lo <= hi:
        raise ValueError(f"QuantSpec.{name} = {(lo, hi)} is inverted: write it as (low, high) with low <= high")
      if not lo <= start <= hi:
        raise ValueError(f"QuantSpec.{name} = {(lo, hi)} must contain {start}, the factor's starting value (the "
                         "calibrated range): e.g. (0.5, 1.0) for scales and widths, (-0.2, 0.4) for shifts")
    if self.scale_bounds[0] <= 0:
      raise ValueError(f"QuantSpec.scale_bounds must be positive, got {self.scale_bounds}")

  @classmethod
  def fat(cls, bits: int = 8, *, symmetric: bool = True, per_channel: bool = False, variant: str = "paper",
          **kwargs) -> "QuantSpec":
    """A FAT spec with the paper's bounds (``variant='paper'``) or the public reference code's (``'reference'``);
    ``kwargs`` may set other fields, bounds included (``scale_bounds=(0.5, 2.0)``: factors that may widen the
    calibrated range up to twice)."""
    bounds = {"paper": PAPER_BOUNDS, "reference": REFERENCE_BOUNDS}
    if variant not in bounds:
      raise ValueError(f"unknown FAT variant {variant!r}; choose 'paper' or 'reference'")
    return cls(bits=bits, symmetric=symmetric, per_channel=per_channel, **{**bounds[variant], **kwargs})


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """``pattern`` (a regular expression matched against the whole tensor name) -> ``spec`` (None: stay float)."""

  pattern: str
  spec: QuantSpec | None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"QuantRule pattern {self.pattern!r} is not a valid regular expression: {e}") from None
    if not (self.spec is None or isinstance(self.spec, QuantSpec)):
      raise ValueError(f"QuantRule {self.pattern!r}: the spec must be a QuantSpec or None (float), got "
                       f"{type(self.spec).__name__} {self.spec!r}; from a dict: QuantSpec(**d)")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """An ordered tuple of rules; the first match wins. Hashable, so it can be a Flax module attribute.

  ``learn_biases``: a regular expression on layer names (``conv1``, ``fc2``, ``block3/expand``; None: no layer).
  Each matching layer's bias gets a learned offset, ``b' = b + delta`` with ``delta`` (zeros at the start) in the
  ``quant`` collection next to the FAT factors, so that fine-tuning also corrects the mean error that rounding the
  weights and activations puts into each output channel (bias correction, learned by distillation instead of measured).

  ``track_bias_correction``: the biases were bias-corrected for the calibrated weight grids (empirical bias
  correction, :func:`fatq.equalize.correct_bias`), and each layer keeps that correction true as fine-tuning moves its
  kernel's grid: ``b' = b - E[(W_q - W_q0) x]`` per output channel, with ``W_q0`` the kernel on its calibrated grid
  (the FAT factors at their initial values), ``W_q`` on its current one, and ``E[x]`` the mean input patch that
  calibration records (``quant_stats/<layer>/input_mean``). ``b' = b`` at the calibrated thresholds.

  :func:`fatq.layers.fold_biases` moves offsets and tracked corrections into the biases (for checkpoints and export).
  """

  rules: tuple[QuantRule, ...] = ()
  learn_biases: str | None = None
  track_bias_correction: bool = False

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    if self.learn_biases is not None:
      try:
        re.compile(self.learn_biases)
      except (re.error, TypeError) as e:
        raise ValueError(f"learn_biases {self.learn_biases!r} is not a regular expression of layer names: {e}") \
            from None

  def spec_for(self, name: str) -> QuantSpec | None:
    for rule in self.rules:
      if re.fullmatch(rule.pattern, name):
        return rule.spec
    return None

  def _first_match(self, name: str) -> int:
    return next((i for i, rule in enumerate(self.rules) if re.fullmatch(rule.pattern, name)), len(self.rules))

  def learns_bias(self, layer: str) -> bool:
    return self.learn_biases is not None and re.fullmatch(self.learn_biases, layer) is not None

  def check_matches(self, names: Iterable[str]) -> None:
    """Raise if a rule matches none of the model's quantization points (almost always a typo in a pattern), or if
    earlier rules take every point it matches (first match wins: it would never apply). ``names``: every point,
    quantized or left in float (:func:`fatq.calibration.point_names`)."""
    names = list(names)
    for i, rule in enumerate(self.rules):
      matched = [n for n in names if re.fullmatch(rule.pattern, n)]
      if not matched:
        close = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise ValueError(f"quantization rule {rule.pattern!r} matches no tensor of this model; "
                         f"its quantization points are named like: {close}")
      if all(self._first_match(n) < i for n in matched):
        before = sorted({self.rules[self._first_match(n)].pattern for n in matched})
        raise ValueError(f"quantization rule {rule.pattern!r} never applies: every tensor it matches "
                         f"({', '.join(matched[:4])}{' ...' if len(matched) > 4 else ''}) is matched first by "
                         f"{', '.join(map(repr, before))} (the first matching rule wins; the input image's rule comes "
                         "from config.input_bits): narrow the earlier rule, or set what you meant there")
    if self.learn_biases is None:
      return
    layers = sorted({n.rpartition("/")[0] for n in names if "/" in n})
    if not any(self.learns_bias(l) for l in layers):
      raise ValueError(f"learn_biases {self.learn_biases!r} matches no layer of this model; its layers are named "
                       f"like: {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}")

  @classmethod
  def uniform(cls, weight: QuantSpec | None, activation: QuantSpec | None,
              extra: Sequence[QuantRule] = ()) -> "QuantConfig":
    """Weights (``.../kernel``) with one spec and every activation point with another; ``extra`` rules go first."""
    return cls(tuple(extra) + (QuantRule(r".*kernel", weight), QuantRule(r".*", activation)))

  @classmethod
  def from_dict(cls, cfg) -> "QuantConfig":
    """Build from a config dict: ``weight_bits``, ``act_bits`` (0 or None = float), ``per_channel``, ``symmetric``,
    ``variant``, ``act_symmetric`` (defaults to ``symmetric``), ``trainable``, ``weight_calibration`` and
    ``act_calibration`` (the weights' and the activations' ``QuantSpec.calibration``, default ``'minmax'``),
    ``percentile`` (their ``QuantSpec.percentile``), optional
    ``rules`` (a list of ``(pattern, spec-dict or None)`` that take precedence) and ``learn_biases`` (True: every
    layer, or a pattern of layer names; False / None: none)."""
    cfg = dict(cfg)
    known = {"weight_bits", "act_bits", "per_channel", "symmetric", "act_symmetric", "variant", "trainable", "rules",
             "learn_biases", "weight_calibration", "act_calibration", "percentile"}
    unknown = set(cfg) - known
    if unknown:
      raise ValueError(f"unknown quantization option(s) {sorted(unknown)}; known options: {sorted(known)}")
    symmetric = cfg.get("symmetric", True)
    common = dict(variant=cfg.get("variant", "paper"), trainable=cfg.get("trainable", True),
                  percentile=cfg.get("percentile", QuantSpec.percentile))
    wb, ab = cfg.get("weight_bits", 8), cfg.get("act_bits", 8)
    weight = QuantSpec.fat(wb, symmetric=symmetric, per_channel=cfg.get("per_channel", False),
                           calibration=cfg.get("weight_calibration", "minmax"), **common) if wb else None
    act = QuantSpec.fat(ab, symmetric=cfg.get("act_symmetric", symmetric),
                        calibration=cfg.get("act_calibration", "minmax"), **common) if ab else None
    extra = [QuantRule(p, None if s is None else _spec_of_rule(p, s)) for p, s in cfg.get("rules", ())]
    learn = cfg.get("learn_biases", None)
    if not (learn is None or isinstance(learn, (bool, str))):
      raise ValueError(f"learn_biases must be True, False or a pattern of layer names, got {learn!r}")
    learn = ".*" if learn is True else (learn or None)
    return dataclasses.replace(cls.uniform(weight, act, extra), learn_biases=learn)


def _spec_of_rule(pattern: str, spec) -> QuantSpec:
  """``QuantSpec(**spec)`` for a config rule, with the rule named in the message if a key is unknown."""
  spec, fields = dict(spec), [f.name for f in dataclasses.fields(QuantSpec)]
  unknown = set(spec) - set(fields)
  if unknown:
    raise ValueError(f"quantization rule {pattern!r}: unknown QuantSpec field(s) {sorted(unknown)}; the fields are "
                     f"{fields}")
  return QuantSpec(**spec)
