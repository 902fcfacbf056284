"""Peak memory of calibration, a FAT training step and evaluation, and the largest batch that fits.

    python bench/memory.py [--model mobilenet_v2] [--width 1.0] [--size 224] [--batch 32] [--out memory.json]
                           [--no-run] [--search calibration,train_step,evaluation] [--resolution 8] [--headroom 0.9]

For each phase the jitted function the library runs (``calibrate``'s statistics update, ``make_train_step``'s step,
``predict``'s forward) is compiled for ``--batch`` from shapes only and XLA's buffer assignment is read:
``peak = argument + output + temp - alias`` bytes (what one call needs; XLA:CPU's own ``peak_memory_in_bytes``
leaves out temporaries). Unless ``--no-run``, each compiled function is then run once on random data and the
process's resident-set high-water mark during the call is measured (``/proc/self/status`` VmHWM, reset through
``/proc/self/clear_refs``).

Memory available: the device's ``bytes_limit - bytes_in_use`` on GPU/TPU, else ``/proc/meminfo`` MemAvailable (or
free pages from ``os.sysconf``) read at start-up, times ``--headroom``. A batch fits when its compiled peak is within
that. The largest batch is searched by compilation only (nothing big is allocated): peaks are affine in the batch,
so two compilations predict it and a bisection between batches that do and do not fit confirms it to
``--resolution``. Everything is per device: with data parallelism it is the per-device batch.

Weights are random and thresholds at their initial values: memory does not depend on them. Not counted: the images
the fine-tuning loop keeps in host memory (``size^2 * 3 * 4`` bytes each) and XLA's compiler itself.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import fatq
from fatq import cli, training
from fatq.layers import STATS
from fatq.models import registry

MB = 2 ** 20
PHASES = ("calibration", "train_step", "evaluation")


def available_bytes() -> tuple[int, str]:
  """Free memory of the first device: accelerator ``memory_stats`` when there are some, else host memory."""
  stats = jax.devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"{jax.devices()[0].platform} bytes_limit"
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "os.sysconf free pages"


def _status_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_hwm() -> bool:
  """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


class Bench:
  """The three phases of ``model`` as functions of the batch size, from shapes only."""

  def __init__(self, model, size: int):
    self.model, self.size = model, size
    one = self.images(1)
    self.params = jax.eval_shape(model.init, jax.random.key(0), one)["params"]
    self.stats = jax.eval_shape(self._stats_first, self.params, one)
    self.thresholds = jax.eval_shape(lambda p, s, x: fatq.init_thresholds(model, p, s, x), self.params, self.stats,
                                     one)
    cfg = ml_collections.ConfigDict(dict(schedule="cosine_restarts", lr=1e-3, lr_min=0.0, restart_period=100))
    self.tx, _ = training.make_optimizer(cfg)
    self.state = jax.eval_shape(lambda th: training.TrainState(jnp.zeros([], jnp.int32), th, self.tx.init(th)),
                                self.thresholds)
    self.num_classes = jax.eval_shape(lambda p, x: model.clone(quant=None).apply({"params": p}, x),
                                      self.params, one).shape[-1]
    self.step = training.make_train_step(model, self.tx, training.rmse)
    # as calibrate and predict define them
    self.stats_update = jax.jit(
        lambda p, s, x: model.apply({"params": p, STATS: s}, x, mutable=[STATS])[1][STATS])
    self.forward = jax.jit(lambda v, x: model.apply(v, x))

  def _stats_first(self, p, x):
    return self.model.apply({"params": p}, x, mutable=[STATS])[1][STATS]

  def images(self, batch: int):
    return jax.ShapeDtypeStruct((batch, self.size, self.size, 3), jnp.float32)

  def args(self, phase: str, batch: int) -> tuple:
    """Arguments of ``phase`` at ``batch``, as shapes."""
    frozen = {"params": self.params, STATS: self.stats}
    if phase == "calibration":
      return self.params, self.stats, self.images(batch)
    if phase == "train_step":
      return self.state, frozen, self.images(batch), jax.ShapeDtypeStruct((batch, self.num_classes), jnp.float32)
    if phase == "evaluation":
      return {**frozen, fatq.THRESHOLDS: self.thresholds}, self.images(batch)
    raise ValueError(phase)

  def fn(self, phase: str):
    return {"calibration": self.stats_update, "train_step": self.step, "evaluation": self.forward}[phase]

  def compile(self, phase: str, batch: int):
    t0 = time.perf_counter()
    compiled = self.fn(phase).lower(*self.args(phase, batch)).compile()
    m = compiled.memory_analysis()
    sizes = dict(batch=batch, argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                 temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes,
                 code=m.generated_code_size_in_bytes, compile_s=round(time.perf_counter() - t0, 1))
    sizes["peak"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return compiled, sizes

  def concrete(self, phase: str, batch: int, seed: int = 0) -> tuple:
    """Random arguments of ``phase``: normal weights and logits, images in [-1, 1], statistics +-3, thresholds at
    their initial values (scale / width 1, shift 0)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
      name = jax.tree_util.keystr(path)
      if "'min'" in name:
        return np.full(s.shape, -3.0, s.dtype)
      if "'max'" in name:
        return np.full(s.shape, 3.0, s.dtype)
      if "'shift'" in name or jnp.issubdtype(s.dtype, jnp.integer):
        return np.zeros(s.shape, s.dtype)
      if "'scale'" in name or "'width'" in name:
        return np.ones(s.shape, s.dtype)
      return (rng.standard_normal(s.shape) * 0.05).astype(s.dtype)

    out = []
    for a in self.args(phase, batch):
      if isinstance(a, jax.ShapeDtypeStruct) and len(a.shape) == 4:  # images
        out.append(rng.uniform(-1, 1, a.shape).astype(a.dtype))
      elif isinstance(a, training.TrainState):  # Adam moments start at zero, as optimizer.init gives them
        th = jax.tree_util.tree_map_with_path(fill, a.thresholds)
        out.append(training.TrainState(jnp.zeros([], jnp.int32), th, self.tx.init(th)))
      else:
        out.append(jax.tree_util.tree_map_with_path(fill, a))
    return tuple(jax.device_put(out))


def run_once(compiled, args) -> dict:
  """Resident memory before and at its highest during one call of ``compiled`` (after a warm-up-free call: the
  executable is already compiled)."""
  jax.block_until_ready(args)
  before = _status_kb("VmRSS")
  reset = _reset_hwm()
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - t0
  peak = _status_kb("VmHWM") if reset else None
  return dict(rss_before=before * 1024 if before else None, rss_peak=peak * 1024 if peak else None,
              hwm_reset=reset, seconds=round(seconds, 2))


def largest_batch(bench: Bench, phase: str, budget: int, known: dict, resolution: int, log,
                  max_batch: int = 2 ** 16) -> dict:
  """Largest multiple of ``resolution`` whose compiled peak is within ``budget``. Peaks are close to affine in the
  batch, so each probe is the affine prediction through the two probes nearest the budget (secant steps), with a
  bisection whenever two probes in a row land on the same side; it ends between a batch that fits and the next
  multiple of ``resolution``, which does not (``first_too_big`` None: even ``max_batch`` fits)."""
  probes = {known["batch"]: known}

  def fits(b):
    if b not in probes:
      _, probes[b] = bench.compile(phase, b)
      log(f"  {phase}: batch {b} -> {probes[b]['peak'] / MB:.0f} MB "
          f"({'fits' if probes[b]['peak'] <= budget else 'too big'}, compiled in {probes[b]['compile_s']} s)")
    return probes[b]["peak"] <= budget

  b0 = known["batch"]
  b1 = 2 * b0 if fits(b0) else max(b0 // 2 // resolution * resolution, resolution)
  if b1 == b0:
    b1 = b0 + resolution
  fits(b1)
  slope = (probes[b1]["peak"] - probes[b0]["peak"]) / (b1 - b0)
  fixed = probes[b0]["peak"] - slope * b0
  # the answer is a multiple of resolution: --batch and 2 --batch need not be (they still feed the affine fit)
  lo = max([b for b in probes if fits(b) and b % resolution == 0], default=0)  # fits (0: no multiple yet)
  hi = min([-(-b // resolution) * resolution for b in probes if not fits(b)], default=None)  # does not fit
  sides = []
  while hi is None or hi - lo > resolution:
    # the affine prediction through the two probes nearest the budget (a secant step) ...
    near = sorted(probes, key=lambda b: abs(probes[b]["peak"] - budget))[:2]
    (ba, pa), (bb, pb) = [(b, probes[b]["peak"]) for b in near]
    b = (ba + (budget - pa) * (bb - ba) / (pb - pa)) if pb < pa or pb > pa else 2 * lo
    b = int(min(b, 2 * max_batch)) // resolution * resolution
    if len(sides) >= 2 and sides[-1] == sides[-2]:  # ... unless it moved one end twice running: then halve
      b = (lo + hi) // 2 // resolution * resolution if hi is not None else 2 * lo
    b = min(max(b, lo + resolution), hi - resolution) if hi is not None else max(b, lo + resolution)
    if b <= lo:
      break
    if b > max_batch:  # probe the cap itself: if it fits, stop there
      b = max_batch // resolution * resolution
      if b <= lo:
        break
      if fits(b):
        lo = b
        break
      hi = b
      continue
    if fits(b):
      lo = b
      sides.append("lo")
    else:
      hi = b
      sides.append("hi")
  return dict(batch=lo, peak=probes[lo]["peak"] if lo else None, first_too_big=hi,
              affine_mb=dict(fixed=round(fixed / MB, 1), per_image=round(slope / MB, 2)),
              probes=sorted((b, round(p["peak"] / MB, 1)) for b, p in probes.items()))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="mobilenet_v2")
  ap.add_argument("--width", type=float, default=1.0)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--impl", default="fast", help="convolution implementation ('fast' for training, 'lax')")
  ap.add_argument("--no-run", dest="run", action="store_false", help="compile only: no measured RSS")
  ap.add_argument("--search", default=",".join(PHASES), help="phases to find the largest batch of ('' for none)")
  ap.add_argument("--resolution", type=int, default=8, help="the largest batch is a multiple of this")
  ap.add_argument("--max-batch", type=int, default=2 ** 16, help="search no further")
  ap.add_argument("--headroom", type=float, default=0.9, help="fraction of the available memory a batch may use")
  ap.add_argument("--out", default="", help="also write the figures as JSON to this file")
  a = ap.parse_args()
  unknown = [p for p in a.search.split(",") if p and p not in PHASES]
  if unknown:  # before minutes of compiling
    ap.error(f"--search {a.search!r}: unknown phase(s) {unknown}; choose among {','.join(PHASES)}")
  for flag, value in (("--batch", a.batch), ("--resolution", a.resolution), ("--size", a.size)):
    if value < 1:
      ap.error(f"{flag} {value}: must be a positive integer")
  log = lambda s: print(s, flush=True)  # noqa: E731

  avail, source = available_bytes()  # before this process allocates anything big
  budget = int(avail * a.headroom)
  quant = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(8, per_channel=True), fatq.QuantSpec.fat(8, symmetric=False))
  model = registry.build(dict(name=a.model, width=a.width, num_classes=1001, impl=a.impl), quant)
  bench = Bench(model, a.size)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
  log(f"{a.model} {a.width} at {a.size}px, impl {a.impl}, 8-bit FAT; {device}; per device")
  log(f"available: {avail / MB:.0f} MB ({source}); budget x{a.headroom} = {budget / MB:.0f} MB")

  phases = {}
  for phase in PHASES:
    compiled, sizes = bench.compile(phase, a.batch)
    entry = dict(compiled=sizes, fits=sizes["peak"] <= budget)
    log(f"  {phase}: batch {a.batch} compiled in {sizes['compile_s']} s, peak {sizes['peak'] / MB:.0f} MB")
    if a.run:
      entry["run"] = run_once(compiled, bench.concrete(phase, a.batch))
      r = entry["run"]
      if r["rss_peak"]:
        log(f"  {phase}: ran in {r['seconds']} s, RSS {r['rss_before'] / MB:.0f} -> peak {r['rss_peak'] / MB:.0f} MB")
    del compiled
    phases[phase] = entry

  for phase in [p for p in a.search.split(",") if p]:
    phases[phase]["largest"] = largest_batch(bench, phase, budget, phases[phase]["compiled"], a.resolution, log,
                                              a.max_batch)

  log("")
  log(f"batch {a.batch}          args MB   out MB    temp MB   peak MB   run RSS peak MB (+ over before)   fits")
  for phase, e in phases.items():
    c, r = e["compiled"], e.get("run", {})
    rss = (f"{r['rss_peak'] / MB:>8.0f} (+{(r['rss_peak'] - r['rss_before']) / MB:.0f})" if r.get("rss_peak")
           else f"{'-':>8}")
    log(f"{phase:<15} {c['argument'] / MB:>9.1f} {c['output'] / MB:>8.1f} {c['temp'] / MB:>10.1f} "
        f"{c['peak'] / MB:>9.1f}   {rss:<32} {'yes' if e['fits'] else 'NO'}")
  searched = [p for p in phases if "largest" in phases[p]]
  if searched:
    log(f"\nlargest batch (multiple of {a.resolution}) within {budget / MB:.0f} MB, from compiled peaks:")
    for phase in searched:
      f = phases[phase]["largest"]
      peak = f"{f['peak'] / MB:.0f} MB" if f["peak"] else "-"
      over = f"{f['first_too_big']} does not fit" if f["first_too_big"] else f"--max-batch {a.max_batch} reached"
      log(f"{phase:<15} {f['batch']:>6}  (peak {peak}; {over}; affine fit "
          f"{f['affine_mb']['fixed']} MB + {f['affine_mb']['per_image']} MB/image; "
          f"{len(f['probes'])} compilations)")
  log(f"host memory of the fine-tuning images (not in the above): {a.size * a.size * 3 * 4 / MB:.2f} MB per image")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(dict(args=vars(a), device=device, available_bytes=avail, available_source=source,
                     budget_bytes=budget, phases=phases), f, indent=2)


if __name__ == "__main__":
  cli.tune_malloc(keep_mapped=False)  # huge pages; each call's buffers unmapped after it, as RSS measures
  cli.interruptible(main)()
