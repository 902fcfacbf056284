"""Where interpreter and JAX fake-quant logits differ, for an exported row: the JAX model with and without the two
export rules (global average pool quantized on its input's grid, int32 biases), in the configured convolution form
and in the exported ('lax') form, against the interpreter with XNNPACK, with TFLite's builtin kernels and with its
reference kernels; and, as the floor, implementations of the same model against each other (the three kernel sets,
fatq.integer's JAX integer model, JAX 'fast' vs 'lax').

    python experiments/export_agreement.py --workdir runs/mobilenet_v1_0.75_quick [--row NAME] [--lax]

Needs WORKDIR/rows/<row>/tflite/{model.tflite,thresholds.json} from experiments/export_tflite.py. Prints a table and
writes WORKDIR/rows/<row>/tflite/agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--row", default=None)
  ap.add_argument("--lax", action="store_true", help="also evaluate the JAX model in the exported 'lax' form (slow)")
  ap.add_argument("--limit", type=int, default=0)
  args = ap.parse_args()

  from fatq import experiment, fileio, tasks
  from fatq import export as E

  if args.limit < 0:
    ap.error(f"--limit {args.limit}: must be >= 0 (a count of images)")
  try:
    cfg = experiment.run_config(args.workdir)
  except experiment.InputError as e:
    sys.exit(f"error: {e}")
  rows = {experiment.row_name(r): r for r in cfg.rows}
  try:
    row = E.fine_tuned_row(cfg, args.workdir, args.row, has=os.path.join("tflite", "model.tflite"), what="exported")
  except E.ExportError as e:
    sys.exit(f"error: {e} (export one with experiments/export_tflite.py)")
  d = os.path.join(args.workdir, "rows", row, "tflite")
  model, params, data = tasks.prepare(cfg, args.workdir, progress=False)
  images, labels = data.eval_images, data.eval_labels
  if args.limit:
    images, labels = images[:args.limit], labels[:args.limit]
  th = json.load(open(os.path.join(d, "thresholds.json")))
  step = float(np.asarray({t["name"]: t for t in th["tensors"]}[th["output"]]["scale"]))
  biases = {t["name"]: np.asarray(t["values_int32"], np.float64) * np.asarray(t["scale"], np.float64)
            for t in th["tensors"] if t["kind"] == "bias"}
  quant = experiment.quant_config(rows[row], experiment.base_rules(cfg))
  variables = experiment.load_variables(os.path.join(args.workdir, "rows", row, "checkpoint"))
  qmodel = experiment.row_model(model, rows[row]).clone(quant=quant)  # as exported: equalize='relu' rows use ReLU
  tied, tied_vars, src = E.tie_pool(qmodel, variables, images[:1])

  lite = {}
  for name, kernels in (("XNNPACK", "xnnpack"), ("builtin", "builtin"), ("reference", "reference")):
    t0 = time.time()
    lite[name] = E.TFLiteModel(os.path.join(d, "model.tflite"), num_threads=2, kernels=kernels)(images)
    print(f"interpreter ({name}): {time.time() - t0:.0f} s", flush=True)
  forms = [(getattr(model, "impl", "lax"), lambda m: m)]
  if args.lax and hasattr(model, "impl") and model.impl != "lax":
    forms.append(("lax", lambda m: m.clone(impl="lax")))
  variants = [("float", "float", qmodel, variables), ("float", "int32", qmodel, E.set_biases(variables, biases))]
  if src:
    variants += [("input grid", "float", tied, tied_vars),
                 ("input grid", "int32", tied, E.set_biases(tied_vars, biases))]
  results, logits = [], {}
  for k, (impl, form) in enumerate(forms):
    for pool, bias, m, v in variants:
      if k > 0 and (pool, bias) not in (("float", "float"), ("input grid", "int32")):  # the extra --lax pass
        continue
      t0 = time.time()
      jl = logits[impl, pool, bias] = E.predict(form(m), v, images)
      for kernels, ll in lite.items():
        r = E.compare_logits(jl, ll, labels, step, data.label_offset)
        r.update(jax_impl=impl, pool=pool, bias=bias, kernels=kernels)
        results.append(r)
      print(f"JAX {impl} pool={pool} bias={bias}: {time.time() - t0:.0f} s", flush=True)
  # Two correct implementations of the same model against each other: the floor of what agreement can mean here.
  noise = {f"TFLite {a} vs TFLite {b} kernels": E.compare_logits(lite[a], lite[b], labels, step, data.label_offset)
           for a, b in (("XNNPACK", "builtin"), ("XNNPACK", "reference"), ("builtin", "reference"))}
  from fatq.integer import IntegerModel
  for arithmetic, own in (("reference", "reference"), ("xnnpack", "XNNPACK")):
    t0 = time.time()
    integer = IntegerModel(os.path.join(d, "model.tflite"), kernels=arithmetic)(images)
    print(f"fatq integer model ({arithmetic} arithmetic): {time.time() - t0:.0f} s", flush=True)
    for name in (own, "builtin"):
      noise[f"fatq integer (JAX, {arithmetic} arithmetic) vs TFLite {name} kernels"] = E.compare_logits(
          integer, lite[name], labels, step, data.label_offset)
  if len(forms) > 1:  # two float32 JAX forms, same rules
    a, b = (logits.get((f, "input grid" if src else "float", "int32")) for f in (forms[0][0], "lax"))
    noise[f"JAX {forms[0][0]} vs JAX lax"] = E.compare_logits(a, b, labels, step, data.label_offset)
  fileio.write_text(os.path.join(d, "agreement.json"), json.dumps(dict(
      row=row, images=len(images), pool_input=src, results=results, implementations_vs_each_other=noise), indent=2))
  print(f"\n{row}: {len(images)} images, output step {step:.4g}")
  print(f"{'JAX form':<8} {'pool':<11} {'bias':<6} {'kernels':<8} {'JAX top-1':>9} {'TFL top-1':>9} {'agree':>7} "
        f"{'tie-aw.':>7} {'max st':>6} {'mean st':>7}")
  for r in results:
    print(f"{r['jax_impl']:<8} {r['pool']:<11} {r['bias']:<6} {r['kernels']:<8} {100 * r['top1_jax']:>8.2f}% "
          f"{100 * r['top1_tflite']:>8.2f}% {100 * r['agreement']:>6.2f}% {100 * r['agreement_tie_aware']:>6.2f}% "
          f"{r['max_logit_diff_steps']:>6.1f} {r['mean_logit_diff_steps']:>7.3f}")
  for name, n in noise.items():
    print(f"{name}: agreement {100 * n['agreement']:.2f}%, tie-aware {100 * n['agreement_tie_aware']:.2f}%, "
          f"max {n['max_logit_diff_steps']:.1f} steps, mean {n['mean_logit_diff_steps']:.3f}")
  print(f"\nresults: {os.path.join(d, 'agreement.json')}")


if __name__ == "__main__":
  from fatq import cli
  cli.tune_malloc()  # restarts the process with malloc tuned for XLA:CPU (huge pages, buffers kept mapped)
  cli.interruptible(main)()
