"""Throughput of FAT fine-tuning on CPU: float forward vs training step, fast vs plain-lax convolutions.

    python bench/finetune_step.py [--model mobilenet_v2] [--width 1.0] [--batch 32] [--size 224] [--steps 3]
    python bench/finetune_step.py --breakdown   # where the fast step's time goes
    python bench/finetune_step.py --tracked     # the cost of a tracked bias correction (bias_correction='tracked')
    python bench/finetune_step.py --malloc      # malloc as tuned (fatq.cli.tune_malloc) against glibc's default

A training step is the quantized student's forward and backward w.r.t. the thresholds plus the Adam update, with
cached teacher logits (as experiments/finetune.py runs it). Weights are random: speed does not depend on them.
Prints images/s for each, the step/forward cost ratio (target <= 3) and the fast/lax speed-up (target >= 3).

``--breakdown`` times, with the fast convolutions, the pieces between a float forward and a training step: the
quantized forward, the float backward pass to the input only and to every weight (no quantizer), and the gradient
w.r.t. the thresholds; each as a multiple of the float forward, in time and in FLOPs (XLA's count). The FLOP
column is the floor a backward pass sets: the input and weight gradients of a layer each cost about as much
arithmetic as its forward.

``--tracked`` times the fast step without and with a tracked bias correction (each layer re-quantizes its kernel at
the calibrated thresholds and contracts the grid shift with its mean input patch) and prints the ratio.

Like the experiments, the benchmark runs with glibc's malloc tuned for XLA:CPU (:func:`fatq.cli.tune_malloc`):
transparent huge pages where the system offers them (``FATQ_HUGE_PAGES=0`` for 4 KiB pages) and each program's
temporaries kept mapped between calls (``FATQ_KEEP_MAPPED=0`` to unmap them). ``--malloc`` runs the fast
measurement in three child processes: glibc's default, huge pages, huge pages with buffers kept mapped.

Each call waits for the one before, as in the training loop (it reads every step's loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import fatq
from fatq import cli, training
from fatq.layers import THRESHOLDS
from fatq.models import registry


def timed(fn, *args, steps: int) -> float:
  """Seconds per call after one warm-up (compilation) call, each call waited for (not queued behind the last)."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / steps


def setup(name: str, width: float, impl: str, batch: int, size: int, tracked: bool = False) -> SimpleNamespace:
  """A W8A8 FAT model (per-channel weights, asymmetric activations) calibrated on one random batch; ``tracked``:
  with a tracked bias correction (``QuantConfig.track_bias_correction``)."""
  quant = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(8, per_channel=True), fatq.QuantSpec.fat(8, symmetric=False))
  quant = dataclasses.replace(quant, track_bias_correction=tracked)
  model = registry.build(dict(name=name, width=width, num_classes=1001, impl=impl), quant)
  x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), x[:1])["params"]
  stats = fatq.calibrate(model, params, [x])
  teacher = model.clone(quant=None)
  return SimpleNamespace(model=model, teacher=teacher, x=x, params=params,
                         frozen={"params": params, "quant_stats": stats},
                         thresholds=fatq.init_thresholds(model, params, stats, x[:1]),
                         logits=teacher.apply({"params": params}, x))


def measure(name: str, width: float, impl: str, batch: int, size: int, steps: int, tracked: bool = False) -> dict:
  m = setup(name, width, impl, batch, size, tracked)
  forward = jax.jit(lambda p, x: m.teacher.apply({"params": p}, x))
  cfg = ml_collections.ConfigDict(dict(schedule="cosine_restarts", lr=1e-3, lr_min=0.0, restart_period=100))
  tx, _ = training.make_optimizer(cfg)
  step = training.make_train_step(m.model, tx, training.rmse)
  state = training.TrainState(jnp.zeros([], jnp.int32), m.thresholds, tx.init(m.thresholds))
  t_fwd = timed(forward, m.params, m.x, steps=steps)
  t_step = timed(lambda s: step(s, m.frozen, m.x, m.logits)[1], state, steps=steps)
  return dict(impl=impl, tracked=tracked, forward_img_s=batch / t_fwd, step_img_s=batch / t_step,
              step_over_forward=t_step / t_fwd)


def flops(fn, *args) -> float:
  """Floating-point operations of one call, as XLA's cost analysis of the compiled program counts them."""
  return float(fn.lower(*args).compile().cost_analysis().get("flops", float("nan")))


def breakdown(name: str, width: float, batch: int, size: int, steps: int) -> dict[str, dict[str, float]]:
  """Seconds and FLOPs per call of each piece of the fast training step (see the module docstring)."""
  m = setup(name, width, "fast", batch, size)

  def float_loss(p, x):
    return training.rmse(m.teacher.apply({"params": p}, x), m.logits)

  def threshold_grads(v, x):  # as the train step: weights and statistics are arguments, not constants
    return jax.grad(lambda t: training.rmse(m.model.apply({**v, THRESHOLDS: t}, x), m.logits))(v[THRESHOLDS])

  quantized = {**m.frozen, THRESHOLDS: m.thresholds}
  pieces = {  # label: (function of (variables, images), variables)
      "float forward": (lambda p, x: m.teacher.apply({"params": p}, x), m.params),
      "quantized forward": (m.model.apply, quantized),
      "float fwd+bwd, input grad": (jax.grad(float_loss, argnums=1), m.params),
      "float fwd+bwd, weight grads": (jax.grad(float_loss), m.params),
      "quantized fwd+bwd, threshold grads": (threshold_grads, quantized),
  }
  jitted = {label: (jax.jit(fn), v) for label, (fn, v) in pieces.items()}
  return {label: dict(seconds=timed(fn, v, m.x, steps=steps), flops=flops(fn, v, m.x))
          for label, (fn, v) in jitted.items()}


def print_rows(label: str, rows: list[tuple[str, dict]]) -> None:
  """A table of :func:`measure` rows, each named in the first column (headed ``label``)."""
  width = max(len(label), *(len(name) for name, _ in rows))
  print(f"{label:<{width}} {'forward img/s':>14} {'train step img/s':>17} {'step/forward':>13}")
  for name, r in rows:
    print(f"{name:<{width}} {r['forward_img_s']:>14.1f} {r['step_img_s']:>17.1f} {r['step_over_forward']:>13.2f}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="mobilenet_v2")
  ap.add_argument("--width", type=float, default=1.0)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--json", default="", help="also write the figures to this file")
  ap.add_argument("--breakdown", action="store_true", help="time the pieces of the fast step instead")
  ap.add_argument("--impl", default="fast,lax", help="convolutions to measure, comma-separated ('fast', 'lax')")
  ap.add_argument("--tracked", action="store_true",
                  help="compare the fast step with and without a tracked bias correction instead")
  ap.add_argument("--malloc", action="store_true",
                  help="compare glibc's default malloc with huge pages and kept-mapped buffers (fast step) instead")
  a = ap.parse_args()
  malloc_mode = malloc_label()
  if a.malloc:
    rows = [measure_in_child(a, huge, kept) for huge, kept in ((False, False), (True, False), (True, True))]
    print(f"{a.model} {a.width} at {a.size}px, batch {a.batch}, fast convolutions")
    print_rows("malloc", [(r["malloc"], r) for r in rows])
    if rows[2]["malloc"] != malloc_label(True, True):
      print("huge pages or kept-mapped buffers are not available here (see fatq.cli.tune_malloc)")
    for r in rows[1:]:
      print(f"{r['malloc']}: training step {r['step_img_s'] / rows[0]['step_img_s']:.2f}x, "
            f"float forward {r['forward_img_s'] / rows[0]['forward_img_s']:.2f}x glibc's default")
    write_json(a, rows=rows)
    return
  if a.tracked:
    rows = [measure(a.model, a.width, "fast", a.batch, a.size, a.steps, tracked) for tracked in (False, True)]
    print(f"{a.model} {a.width} at {a.size}px, batch {a.batch}, fast convolutions, {malloc_mode}")
    print_rows("bias correction", [("tracked" if r["tracked"] else "none", r) for r in rows])
    print(f"tracked step time / plain step time: {rows[0]['step_img_s'] / rows[1]['step_img_s']:.3f}")
    write_json(a, rows=rows)
    return
  if a.breakdown:
    t = breakdown(a.model, a.width, a.batch, a.size, a.steps)
    base = t["float forward"]
    print(f"{a.model} {a.width} at {a.size}px, batch {a.batch}, fast convolutions, {malloc_mode}")
    print(f"{'piece':<36} {'ms':>8} {'img/s':>7} {'x forward':>10} {'GFLOP':>8} {'x forward':>10}")
    for label, r in t.items():
      print(f"{label:<36} {r['seconds'] * 1e3:>8.0f} {a.batch / r['seconds']:>7.1f} "
            f"{r['seconds'] / base['seconds']:>10.2f} {r['flops'] / 1e9:>8.1f} {r['flops'] / base['flops']:>10.2f}")
    write_json(a, pieces=t)
    return
  impls = a.impl.split(",")
  if not set(impls) <= {"fast", "lax"}:
    ap.error(f"--impl takes 'fast', 'lax' or both, comma-separated; got {a.impl!r}")
  rows = [dict(measure(a.model, a.width, impl, a.batch, a.size, a.steps), malloc=malloc_mode) for impl in impls]
  print(f"{a.model} {a.width} at {a.size}px, batch {a.batch}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {malloc_mode}")
  print_rows("impl", [(r["impl"], r) for r in rows])
  by_impl = {r["impl"]: r for r in rows}
  speedup = by_impl["fast"]["step_img_s"] / by_impl["lax"]["step_img_s"] if len(by_impl) == 2 else None
  if speedup is not None:
    print(f"fast/lax training-step speed-up: {speedup:.2f}x (target >= 3)")
  if "fast" in by_impl:
    print(f"fast step costs {by_impl['fast']['step_over_forward']:.2f} float forwards (target <= 3)")
  write_json(a, rows=rows, speedup=speedup)


def write_json(a, **figures) -> None:
  """The run's arguments and ``figures`` into ``--json FILE``, if one was given."""
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(args=vars(a), **figures), f, indent=2)


def malloc_label(huge: bool | None = None, kept: bool | None = None) -> str:
  """How malloc runs: this process's (arguments None) or the one named."""
  huge = cli.huge_pages_enabled() if huge is None else huge
  kept = cli.buffers_kept_mapped() if kept is None else kept
  return f"{'huge' if huge else '4 KiB'} pages{', kept mapped' if kept else ''}"


def measure_in_child(a, huge: bool, kept: bool) -> dict:
  """The fast row of this benchmark run in a fresh process, with huge pages or 4 KiB pages, with buffers kept
  mapped or not (glibc reads its tunables only at start-up, so one process cannot measure more than one way)."""
  env = cli.malloc_environment(huge, kept)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "rows.json")
    subprocess.run([sys.executable, __file__, "--impl", "fast", "--json", out, "--model", a.model,
                    "--width", str(a.width), "--batch", str(a.batch), "--size", str(a.size), "--steps", str(a.steps)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
      return json.load(f)["rows"][0]


if __name__ == "__main__":
  cli.tune_malloc()
  cli.interruptible(main)()
