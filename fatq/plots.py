"""PNG plots of a fine-tuning run: loss curves, threshold-factor trajectories, and per-point activation histograms
with the initial (calibrated) and learned ranges."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fatq.calibration import points, quant_ranges_of_each  # noqa: E402
from fatq.layers import FakeQuant  # noqa: E402
from fatq.quantizers import QuantParams  # noqa: E402

Tree = Any


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training(metrics: list[dict], out_png: str, title: str = "") -> None:
  """Left: train and held-out distillation loss per step. Right: mean FAT factor (scale, width, shift) of every point
  per step; learned bias offsets, in the biases' units, are left out."""
  fig, (ax_loss, ax_f) = plt.subplots(1, 2, figsize=(13, 4.5))
  steps = [m["step"] for m in metrics]
  ax_loss.plot(steps, [m["holdout_loss"] for m in metrics], "o-", label="held-out")
  train = [(m["step"], m["train_loss"]) for m in metrics if m.get("train_loss") is not None]
  if train:
    ax_loss.plot(*zip(*train), ".-", label="train (window mean)")
  ax_loss.set(xlabel="step", ylabel="distillation loss", title=f"{title} loss".strip())
  ax_loss.legend()
  factors = [m.get("factors", {}) for m in metrics]
  names = sorted({(p, k) for f in factors for p, d in f.items() for k in d if k in ("scale", "width", "shift")})
  # 20 distinct colours (matplotlib's default cycle repeats after 10, which made legend entries ambiguous)
  ax_f.set_prop_cycle(color=plt.get_cmap("tab20").colors)
  for p, k in names:
    ax_f.plot(steps, [f.get(p, {}).get(k, np.nan) for f in factors], lw=0.8, label=f"{p}:{k}")
  ax_f.set(xlabel="step", ylabel="mean factor", title="threshold factors (scale / width / shift)")
  if len(names) <= 20:
    ax_f.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def _activations(model, params: Tree, images) -> dict[str, jax.Array]:
  """The float value arriving at every activation quantization point (weights excluded), by point name."""
  _, state = model.apply({"params": params}, images, capture_intermediates=lambda m, _: isinstance(m, FakeQuant),
                         mutable=["intermediates"])
  return {name: d["__call__"][0] for name, d in points(state["intermediates"]).items() if not name.endswith("kernel")}


def activation_histograms(model, variables_before: Tree, variables_after: Tree, images: np.ndarray,
                          bins: int = 100) -> dict[str, dict[str, np.ndarray]]:
  """Per activation point: ``counts`` of its float values on ``images`` in ``bins`` equal bins between ``edges[0]``
  and ``edges[-1]`` (spanning the values and both ranges, so every value is counted), and its nudged range
  ``before`` and ``after`` fine-tuning (``(lo, hi)``, as :func:`fatq.calibration.quant_ranges` gives it). Points are
  in network order (the order the model applies them)."""
  # jitted: applied op by op, the capture cost MobileNet v2 6 s a row
  acts = jax.jit(functools.partial(_activations, model))(variables_before["params"], images)
  ranges = quant_ranges_of_each(model, (variables_before, variables_after), images[:1])
  out = {}
  for name in ranges[0]:  # in network order; a jitted program's outputs come back sorted
    if name not in acts:
      continue
    a = np.asarray(acts[name])
    before, after = ((p.nudged_min, p.nudged_max) for p in
                     (QuantParams(r[name]["scale"], r[name]["zero_point"], r[name]["qmin"], r[name]["qmax"])
                      for r in ranges))
    left = min(a.min(), before[0].min(), after[0].min())
    right = max(a.max(), before[1].max(), after[1].max())
    counts, edges = np.histogram(a, bins=bins, range=(left, right if right > left else left + 1.0))
    out[name] = dict(counts=counts, edges=edges, before=before, after=after)
  return out


def plot_activation_ranges(model, variables_before: Tree, variables_after: Tree, images: np.ndarray,
                           out_png: str, max_points: int = 48) -> list[str]:
  """A histogram per activation point with the calibrated (dashed) and learned (solid) nudged ranges, in network
  order; returns the points drawn. Beyond ``max_points`` points, evenly spaced ones from the input to the logits."""
  hists = activation_histograms(model, variables_before, variables_after, images)
  names = list(hists)
  if not names:  # weights-only quantization: no activation to draw
    return []
  if len(names) > max_points:
    names = [names[i] for i in sorted(set(np.linspace(0, len(names) - 1, max_points).round().astype(int)))]
  cols = 6
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
  for ax, name in zip(axes.ravel(), names):
    h = hists[name]
    # one artist per panel (ax.hist draws a patch per bin); empty bins left out of the log scale
    ax.stairs(np.where(h["counts"] > 0, h["counts"], np.nan), h["edges"], fill=True, color="0.6")
    ax.set_yscale("log")
    for (lo, hi), style in ((h["before"], "--"), (h["after"], "-")):
      ax.axvline(float(np.min(lo)), ls=style, c="tab:blue", lw=1)
      ax.axvline(float(np.max(hi)), ls=style, c="tab:red", lw=1)
    ax.set_title(name, fontsize=7)
    ax.tick_params(labelsize=6)
  for ax in axes.ravel()[len(names):]:
    ax.axis("off")
  fig.suptitle("activations with calibrated (dashed) and learned (solid) quantization ranges", fontsize=9)
  # fixed margins: tight_layout measured every label of the 48 panels (7 s of MobileNet v2's 20 s of drawing)
  fig.subplots_adjust(left=0.03, right=0.99, bottom=0.03, top=1 - 0.8 / (2.2 * rows), wspace=0.3, hspace=0.5)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return names
