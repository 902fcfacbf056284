"""PNG plots of a fine-tuning run: loss curves, threshold-factor trajectories, and per-point activation histograms
with the initial (calibrated) and learned ranges."""

from __future__ import annotations

import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fatq.calibration import points, quant_ranges  # noqa: E402
from fatq.layers import FakeQuant  # noqa: E402

Tree = Any


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training(metrics: list[dict], out_png: str, title: str = "") -> None:
  """Left: train and held-out distillation loss per step. Right: mean FAT factor of every point per step."""
  fig, (ax_loss, ax_f) = plt.subplots(1, 2, figsize=(13, 4.5))
  steps = [m["step"] for m in metrics]
  ax_loss.plot(steps, [m["holdout_loss"] for m in metrics], "o-", label="held-out")
  train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
  if train:
    ax_loss.plot(*zip(*train), ".-", label="train (window mean)")
  ax_loss.set(xlabel="step", ylabel="distillation loss", title=f"{title} loss".strip())
  ax_loss.legend()
  factors = [m.get("factors", {}) for m in metrics]
  names = sorted({(p, k) for f in factors for p, d in f.items() for k in d})
  for p, k in names:
    ax_f.plot(steps, [f.get(p, {}).get(k, np.nan) for f in factors], lw=0.8, label=f"{p}:{k}")
  ax_f.set(xlabel="step", ylabel="mean factor", title="threshold factors (scale / width / shift)")
  if len(names) <= 16:
    ax_f.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def activations(model, params: Tree, images: np.ndarray) -> dict[str, np.ndarray]:
  """The float value arriving at every activation quantization point (weights excluded), by point name."""
  _, state = model.apply({"params": params}, images, capture_intermediates=lambda m, _: isinstance(m, FakeQuant),
                         mutable=["intermediates"])
  out = {}
  for name, d in points(state["intermediates"]).items():
    if not name.endswith("kernel"):
      out[name] = np.asarray(d["__call__"][0])
  return out


def plot_activation_ranges(model, variables_before: Tree, variables_after: Tree, images: np.ndarray,
                           out_png: str, max_points: int = 48) -> None:
  """A histogram per activation point with the calibrated (dashed) and learned (solid) nudged ranges."""
  acts = activations(model, variables_before["params"], images)
  before = quant_ranges(model, variables_before, images[:1])
  after = quant_ranges(model, variables_after, images[:1])
  names = [n for n in acts if n in before][:max_points]
  cols = 6
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
  for ax, name in zip(axes.ravel(), names):
    ax.hist(acts[name].ravel(), bins=100, log=True, color="0.6")
    for r, style in ((before[name], "--"), (after[name], "-")):
      lo = (r["qmin"] - r["zero_point"]) * r["scale"]
      hi = (r["qmax"] - r["zero_point"]) * r["scale"]
      ax.axvline(float(lo), ls=style, c="tab:blue", lw=1)
      ax.axvline(float(hi), ls=style, c="tab:red", lw=1)
    ax.set_title(name, fontsize=7)
    ax.tick_params(labelsize=6)
  for ax in axes.ravel()[len(names):]:
    ax.axis("off")
  fig.suptitle("activations with calibrated (dashed) and learned (solid) quantization ranges", fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
