"""Peer comparison on the same float model, images and interpreter: TensorFlow Lite's own post-training full-integer
quantization vs fatq's export, plus Google's quantization-aware-trained MobileNet v2 as a reference row.

    python experiments/compare_tflite.py --out runs/compare_tflite/results.json

Models: MobileNet v1 0.75 from the fine-tuned run ``--v1_workdir`` (default runs/mobilenet_v1_0.75_quick: its config,
its fine-tuned row, its calibration images) and MobileNet v2 1.0 from ``--v2_config`` (no fine-tuned row: fatq's
export of the calibrated model, FAT factors at their initial values, i.e. fatq's post-training quantization, with
the same rules as the v1 row). For each: the float model (translated by fatq.export, converted without
quantization); TFLite PTQ (int8 per-channel weights, representative dataset = the same calibration images fatq
calibrated on); fatq's int8 export (fatq.export.export_and_check: read-back check, agreement with the JAX fake-quant
model); for v2 also Google's QAT uint8 MobileNet v2 1.0 (a reference: another float model and training). Top-1 on
the validation images (interpreter, XNNPACK), file size, latency (median single-image invoke) at 1 and 2 threads.
Prints a table and writes results.json (and each model's files under its folder).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import time
from pathlib import Path

import numpy as np

QAT = "models/mobilenet_v2_1.0_224_qat_uint8.tflite"


def evaluate_tflite(name, blob, images, labels, threads, extra=None, latency_runs=50, log=print):
  from fatq.export import TFLiteModel
  t0 = time.time()
  lite = TFLiteModel(blob, num_threads=max(threads))
  logits = lite(images)
  row = dict(model=name, top1=float(np.mean(logits.argmax(1) == labels)), size_bytes=len(blob),
             input=np.dtype(lite.inp["dtype"]).name, output=np.dtype(lite.out["dtype"]).name)
  for t in threads:
    row[f"latency_ms_{t}t"] = round(TFLiteModel(blob, num_threads=t).latency_ms(images[0], runs=latency_runs), 3)
  row.update(extra or {})
  log(f"  {name}: top-1 {100 * row['top1']:.2f}% ({time.time() - t0:.0f} s)")
  return row, logits


def fatq_row(name, report, method):
  e = report["eval"]
  row = dict(model=f"{name} fatq int8", method=method, top1=e["top1_tflite"], size_bytes=report["size_bytes"]["tflite"],
             input=report["input_type"], output=report["output_type"], jax_fake_quant_top1=e["top1_jax"],
             agreement_with_jax=e["agreement"], agreement_with_jax_tie_aware=e["agreement_tie_aware"],
             max_logit_diff_steps=e["max_logit_diff_steps"], readback=f"{report['readback']['matched']}/"
             f"{report['readback']['tensors']}", export_report=report["files"]["report"])
  if "top1_jax_as_finetuned" in e:
    row["jax_top1_as_finetuned"] = e["top1_jax_as_finetuned"]
  row.update({f"latency_ms_{k.rsplit('_', 1)[1]}": v for k, v in report["latency_ms"].items()
              if k.startswith("tflite_")})
  return row


def compare(name, model, params, images, labels, calib, out_dir, args, fatq_export):
  """Float, TFLite PTQ and fatq rows for one model. ``fatq_export(float_blob, out)`` returns the export report."""
  from fatq import export as E

  print(f"== {name}: {len(images)} validation images, {len(calib)} calibration images", flush=True)
  lax = model.clone(impl="lax") if hasattr(model, "impl") else model
  fl = E.float_function(lax, params, images[:1])
  float_blob = E.convert_float(fl)
  rows = []
  row, float_logits = evaluate_tflite(f"{name} float32", float_blob, images, labels, args.threads,
                                      dict(method="float (TFLite, no quantization)"))
  rows.append(row)
  t0 = time.time()
  ptq = E.convert_ptq(fl, calib)
  Path(out_dir).mkdir(parents=True, exist_ok=True)
  Path(out_dir, "tflite_ptq.tflite").write_bytes(ptq)
  row, ptq_logits = evaluate_tflite(f"{name} TFLite PTQ int8", ptq, images, labels, args.threads,
                                    dict(method="TFLite post-training full-integer quantization",
                                         calibration_images=len(calib), convert_seconds=round(time.time() - t0, 1)))
  row["agreement_with_float"] = float(np.mean(ptq_logits.argmax(1) == float_logits.argmax(1)))
  rows.append(row)
  report, method = fatq_export(float_blob, os.path.join(out_dir, "fatq"))
  row = fatq_row(name, report, method)
  row["agreement_with_float"] = float(np.mean(
      np.load(os.path.join(out_dir, "fatq", "logits.npz"))["tflite"].argmax(1) == float_logits.argmax(1)))
  rows.append(row)
  print(f"  {row['model']}: top-1 {100 * row['top1']:.2f}%", flush=True)
  return rows


def v1_rows(args):
  """MobileNet v1 0.75: the fine-tuned row of a finetune.py run (its config, images and calibration set)."""
  import ml_collections

  from fatq import tasks
  from fatq.export import export_row

  cfg = ml_collections.ConfigDict(json.load(open(os.path.join(args.v1_workdir, "results.json")))["config"])
  model, params, data = tasks.prepare(cfg, args.v1_workdir, progress=False)
  images, labels = data.eval_images[:args.limit or None], data.eval_labels[:args.limit or None]
  data.eval_images, data.eval_labels = images, labels

  def export(float_blob, out):
    r = export_row(cfg, model, params, data, args.v1_workdir, None, out, threads=tuple(args.threads),
                   float_blob=float_blob)
    return r, f"fatq export of the fine-tuned row {r['row']} ({args.v1_workdir})"

  return compare("MobileNet v1 0.75", model, params, images, labels, data.calibration,
                 os.path.join(os.path.dirname(args.out), "mobilenet_v1_0.75"), args, export)


def v2_rows(args):
  """MobileNet v2 1.0: no fine-tuned row; fatq's post-training export (calibrated, FAT factors at init)."""
  import ml_collections

  from fatq import calibration, experiment, models
  from fatq.data import imagenet
  from fatq.export import export_and_check
  from fatq.tasks import split_unlabeled

  cfg = runpy.run_path(args.v2_config)["get_config"]()
  model, params, _ = models.load(cfg.model)
  d = cfg.data
  offset = 1 if int(cfg.model.num_classes) == 1001 else 0
  val = imagenet.val_set(d.preprocessing, int(d.image_size), offset, limit=args.limit or None)
  pool = imagenet.unlabeled_set(d.preprocessing, int(d.image_size))
  # the v1 run's split (same pool, sizes and seed): the same 100 calibration images
  split = ml_collections.ConfigDict(dict(num_train=0, num_calibration=args.calib, num_holdout=100))
  _, calib, _ = split_unlabeled(pool.images, split, 0)
  row = ml_collections.ConfigDict(dict(weight_bits=8, act_bits=8, per_channel=True, symmetric=True,
                                       act_symmetric=False))
  quant = experiment.quant_config(row, experiment.base_rules(ml_collections.ConfigDict(dict(input_bits=8))))
  lax = model.clone(impl="lax")
  qmodel = lax.clone(quant=quant)
  stats = calibration.calibrate(qmodel, params, [calib[i:i + 50] for i in range(0, len(calib), 50)])
  variables = {"params": params, "quant_stats": stats,
               "quant": calibration.init_thresholds(qmodel, params, stats, calib[:1])}

  def export(float_blob, out):
    r = export_and_check(qmodel, variables, lax, params, val.images, val.labels, out, threads=tuple(args.threads),
                         float_blob=float_blob, eval_model=model.clone(impl="fast"))
    return r, "fatq export, calibrated thresholds (FAT factors at init): post-training, not fine-tuned"

  out_dir = os.path.join(os.path.dirname(args.out), "mobilenet_v2_1.0")
  rows = compare("MobileNet v2 1.0", model, params, val.images, val.labels, calib, out_dir, args, export)
  if args.qat:
    from fatq.data.paths import data_root
    qat = Path(data_root()) / QAT
    if qat.exists():
      row, _ = evaluate_tflite("Google QAT MobileNet v2 1.0 uint8", qat.read_bytes(), val.images, val.labels,
                               args.threads, dict(method="reference: Google's quantization-aware-trained model "
                                                  "(its own float weights and training)"))
      rows.append(row)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--v1_workdir", default="runs/mobilenet_v1_0.75_quick",
                  help="finetune.py run of MobileNet v1 0.75 with a fine-tuned row ('' to skip)")
  ap.add_argument("--v2_config", default="configs/mobilenet_v2_1.0.py", help="'' to skip")
  ap.add_argument("--calib", type=int, default=100, help="calibration images for v2 (v1: its run's)")
  ap.add_argument("--limit", type=int, default=0, help="validation images (0 = all 1000)")
  ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
  ap.add_argument("--no-qat", dest="qat", action="store_false")
  ap.add_argument("--out", default="runs/compare_tflite/results.json")
  args = ap.parse_args()
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  rows = []
  for enabled, fn in ((args.v1_workdir, v1_rows), (args.v2_config, v2_rows)):
    if enabled:
      rows += fn(args)
      Path(args.out).write_text(json.dumps(dict(rows=rows, args=vars(args)), indent=2))  # after each model
  print(f"\n{'model':<40} {'top-1':>7} {'JAX':>7} {'size KiB':>9} {'1 thr ms':>9} {'2 thr ms':>9} "
        f"{'agree/JAX':>9} {'max steps':>9}")
  for r in rows:
    jax_top1 = f"{100 * r['jax_fake_quant_top1']:.2f}%" if "jax_fake_quant_top1" in r else ""
    agree = f"{100 * r['agreement_with_jax']:.1f}%" if "agreement_with_jax" in r else ""
    steps = f"{r['max_logit_diff_steps']:.0f}" if "max_logit_diff_steps" in r else ""
    print(f"{r['model']:<40} {100 * r['top1']:>6.2f}% {jax_top1:>7} {r['size_bytes'] / 1024:>9.1f} "
          f"{r.get('latency_ms_1t', 0):>9.2f} {r.get('latency_ms_2t', 0):>9.2f} {agree:>9} {steps:>9}")
  print(f"\nresults: {args.out}")


if __name__ == "__main__":
  from fatq import cli
  cli.use_huge_pages()  # restarts the process with huge pages where they help
  main()
