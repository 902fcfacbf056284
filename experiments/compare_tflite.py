"""Peer comparison on the same float model, images and interpreter: TensorFlow Lite's own post-training full-integer
quantization vs fatq's export, plus Google's quantization-aware-trained MobileNet v2 as a reference row.

    python experiments/compare_tflite.py --out runs/compare_tflite/results.json

Models:
* MobileNet v1 0.75 from the fine-tuned run ``--v1_workdir`` (default runs/mobilenet_v1_0.75_quick: its config,
  its fine-tuned row, ``--v1_row`` where it has several, its images and calibration set; ``--v1_workdir=''`` skips
  it). The table names the model as that run's config does;
* the model of ``--config`` (default configs/mobilenet_v2_1.0.py; ``--nopost_training`` skips it), not fine-tuned:
  fatq's export of the calibrated model, FAT factors at their initial values, i.e. fatq's post-training
  quantization, with the same rules as the v1 row. Its images are those of the config's ``data`` section: the
  embedded folders, or e.g. ``--config.data.val_dir=/labeled --config.data.unlabeled_dir=/unlabeled``, or tfds
  with ``--config.data.tfds_name=imagenet2012 --config.data.manual_dir=/archives`` (fatq.data.imagenet).

For each: the float model (translated by fatq.export, converted without quantization); TFLite PTQ (int8 per-channel
weights, representative dataset = the same calibration images fatq calibrated on); fatq's int8 export
(fatq.export.export_and_check: read-back check, agreement with the JAX fake-quant model); for MobileNet v2 also
Google's QAT uint8 MobileNet v2 1.0 (a reference: another float model and training). Top-1 on the validation images
(interpreter, XNNPACK), file size, latency (median single-image invoke) at each of ``--threads``. Prints a table and
writes results.json (rows; per model the images' sources and counts; the arguments), each model's files beside it
(``finetuned_<config name>/`` and ``post_training_<config name>/``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from absl import flags
from ml_collections import config_flags

from fatq import fileio

QAT = "models/mobilenet_v2_1.0_224_qat_uint8.tflite"
TITLES = {"mobilenet_v1_0.75": "MobileNet v1 0.75", "mobilenet_v2_1.0": "MobileNet v2 1.0"}  # config name -> table

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "mobilenet_v2_1.0.py")

flags.DEFINE_string("v1_workdir", "runs/mobilenet_v1_0.75_quick",
                    "finetune.py run of MobileNet v1 0.75 with a fine-tuned row ('' to skip)")
flags.DEFINE_string("v1_row", None, "the --v1_workdir row to export (default: its only fine-tuned row)")
# No default here: ml_collections would read the overrides while defining the flag, outside fatq.cli's error
# messages; __main__ puts --config=DEFAULT_CONFIG on the command line instead when it is missing.
config_flags.DEFINE_config_file("config", None, "model config of the post-training comparison (default "
                                "configs/mobilenet_v2_1.0.py); any key can be overridden, e.g. "
                                "--config.data.val_dir=/labeled/folder", lock_config=False)
flags.DEFINE_bool("post_training", True, "compare the --config model, not fine-tuned (--nopost_training: skip)")
flags.DEFINE_integer("calib", 100, "calibration images of the --config model (v1: its run's)")
flags.DEFINE_integer("limit", 0, "validation images (0: all)")
flags.DEFINE_multi_integer("threads", [1, 2], "interpreter threads for the latencies (repeat the flag)")
flags.DEFINE_bool("qat", True, "add Google's QAT MobileNet v2 as a reference row (--noqat: skip)")
flags.DEFINE_string("out", "runs/compare_tflite/results.json", "results file; model files go beside it")
FLAGS = flags.FLAGS


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
  fileio.write_bytes(Path(out_dir, "tflite_ptq.tflite"), ptq)
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
  from fatq import experiment, tasks
  from fatq.export import ExportError, export_row, fine_tuned_row

  results = Path(args.v1_workdir, "results.json")
  if not results.is_file():
    raise FileNotFoundError(
        f"--v1_workdir={args.v1_workdir}: no finetune.py run there ({results} is missing). Run python "
        f"experiments/finetune.py --config configs/mobilenet_v1_0.75_fat.py:quick --workdir {args.v1_workdir} "
        "first, or pass --v1_workdir='' to leave MobileNet v1 out")
  cfg = experiment.run_config(args.v1_workdir)
  try:  # before any conversion
    row_name = fine_tuned_row(cfg, args.v1_workdir, args.v1_row)
  except ExportError as e:
    raise ValueError(f"--v1_workdir={args.v1_workdir}: {e}; pick one with --v1_row") from None
  model, params, data = tasks.prepare(cfg, args.v1_workdir, progress=False)
  images, labels = data.eval_images[:args.limit or None], data.eval_labels[:args.limit or None]
  data.eval_images, data.eval_labels = images, labels

  def export(float_blob, out):
    r = export_row(cfg, model, params, data, args.v1_workdir, row_name, out, threads=tuple(args.threads),
                   float_blob=float_blob)
    return r, f"fatq export of the fine-tuned row {r['row']} ({args.v1_workdir})"

  name = cfg.get("name", cfg.model.name)
  title = TITLES.get(name, name)
  rows = compare(title, model, params, images, labels, data.calibration,
                 os.path.join(os.path.dirname(args.out), f"finetuned_{name}"), args, export)
  return title, rows, dict(data.sources, num_evaluation=len(images), num_calibration=len(data.calibration))


def post_training_rows(args):
  """The ``--config`` model (default MobileNet v2 1.0), not fine-tuned: fatq's post-training export (calibrated,
  FAT factors at their initial values), on the images its ``data`` section names (folders or tfds)."""
  import ml_collections

  from fatq import calibration, experiment, models
  from fatq.data import imagenet
  from fatq.export import export_and_check
  from fatq.tasks import split_unlabeled

  cfg = args.config
  model, params, _ = models.load(cfg.model)
  d = cfg.data
  offset = 1 if int(cfg.model.num_classes) == 1001 else 0
  val = imagenet.evaluation_set(d, label_offset=offset, limit=args.limit or d.get("val_limit") or None)
  pool = imagenet.unlabeled_pool(d)
  # the v1 run's split (same pool and seed): the same calibration images (the first of its order)
  if len(pool.images) <= args.calib:
    raise ValueError(f"--calib={args.calib}: only {len(pool.images)} unlabeled images in {imagenet.sources(d)}; "
                     "lower --calib or add images")
  split = ml_collections.ConfigDict(dict(num_train=0, num_calibration=args.calib, num_holdout=0))
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

  name = cfg.get("name", cfg.model.name)
  title = TITLES.get(name, name)
  rows = compare(title, model, params, val.images, val.labels, calib,
                 os.path.join(os.path.dirname(args.out), f"post_training_{name}"), args, export)
  if args.qat and name == "mobilenet_v2_1.0":
    from fatq.data.paths import data_root
    from fatq.export import TFLiteModel
    qat = Path(data_root()) / QAT
    want = tuple(TFLiteModel(qat.read_bytes()).inp["shape"][1:]) if qat.exists() else None
    if want is not None and want != val.images.shape[1:]:
      print(f"  Google QAT MobileNet v2 1.0 left out: it takes {want} images, these are {val.images.shape[1:]}")
    elif want is not None:
      row, _ = evaluate_tflite("Google QAT MobileNet v2 1.0 uint8", qat.read_bytes(), val.images, val.labels,
                               args.threads, dict(method="reference: Google's quantization-aware-trained model "
                                                  "(its own float weights and training)"))
      rows.append(row)
  return title, rows, dict(imagenet.sources(d), num_evaluation=len(val.images), num_calibration=len(calib))


def main(argv):
  if len(argv) > 1:  # e.g. '--threads 1 2': absl takes one value per flag
    sys.exit(f"error: unexpected arguments {argv[1:]}; repeat a flag for several values (--threads=1 --threads=2)")
  args = FLAGS
  for flag, least in (("limit", 0), ("calib", 1)):
    if getattr(args, flag) < least:
      sys.exit(f"error: --{flag}={getattr(args, flag)}: must be >= {least} (a count of images)")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  record = dict(rows=[], images={}, args=dict(
      v1_workdir=args.v1_workdir, config=args.config.to_dict() if args.post_training else None,
      post_training=args.post_training, calib=args.calib, limit=args.limit, threads=list(args.threads),
      qat=args.qat, out=args.out, v1_row=args.v1_row))
  for enabled, fn in ((args.v1_workdir, v1_rows), (args.post_training, post_training_rows)):
    if enabled:
      try:
        title, rows, images = fn(args)
      except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
      record["rows"] += rows
      record["images"][title] = images
      fileio.write_text(args.out, json.dumps(record, indent=2))  # after each model, whole
  latency = [f"{t} thr ms" for t in args.threads]
  print(f"\n{'model':<40} {'top-1':>7} {'JAX':>7} {'size KiB':>9} " + " ".join(f"{h:>9}" for h in latency)
        + f" {'agree/JAX':>9} {'max steps':>9}")
  for r in record["rows"]:
    jax_top1 = f"{100 * r['jax_fake_quant_top1']:.2f}%" if "jax_fake_quant_top1" in r else ""
    agree = f"{100 * r['agreement_with_jax']:.1f}%" if "agreement_with_jax" in r else ""
    steps = f"{r['max_logit_diff_steps']:.0f}" if "max_logit_diff_steps" in r else ""
    ms = [f"{r[k]:.2f}" if k in r else "" for k in (f"latency_ms_{t}t" for t in args.threads)]
    print(f"{r['model']:<40} {100 * r['top1']:>6.2f}% {jax_top1:>7} {r['size_bytes'] / 1024:>9.1f} "
          + " ".join(f"{m:>9}" for m in ms) + f" {agree:>9} {steps:>9}")
  print(f"\nresults: {args.out}")


if __name__ == "__main__":
  from fatq import cli
  if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
    sys.argv.insert(1, f"--config={os.path.normpath(DEFAULT_CONFIG)}")
  cli.run(main)  # app.run(main) in a process with huge pages; a bad flag or config key ends in one line
