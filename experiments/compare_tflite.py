"""Peer comparison on the same float model, images and interpreter: TensorFlow Lite's own post-training full-integer
quantization vs fatq's export, plus Google's quantization-aware-trained MobileNet v2 as a reference row.

    python experiments/compare_tflite.py --out runs/compare_tflite/results.json

For each model config: the float model (translated by fatq.export, converted without quantization); TFLite PTQ
(representative dataset = the calibration images); fatq (calibrated on the same images, per-channel symmetric int8
weights, asymmetric int8 activations; FAT factors at their initial values unless --workdir_<name> gives a fine-tuned
checkpoint). Reports top-1 on the validation images, agreement with the JAX fake-quant model, file size, and
interpreter latency (median of single-image invokes) at 1 and 2 threads. Prints a table and writes results.json.
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


def load_checkpoint(workdir):
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(os.path.abspath(os.path.join(workdir, "checkpoint")))


def evaluate_tflite(name, blob, images, labels, threads, extra=None, latency_runs=20):
  from fatq.export import TFLiteModel
  t0 = time.time()
  lite = TFLiteModel(blob, num_threads=2)
  logits = lite(images)
  row = dict(model=name, top1=float(np.mean(logits.argmax(1) == labels)), size_kb=round(len(blob) / 1024, 1),
             input=np.dtype(lite.inp["dtype"]).name)
  for t in threads:
    row[f"latency_ms_{t}t"] = round(TFLiteModel(blob, num_threads=t).latency_ms(images[0], runs=latency_runs), 2)
  row.update(extra or {})
  print(f"  {name}: top-1 {100 * row['top1']:.2f}% ({time.time() - t0:.0f}s)", flush=True)
  return row, logits


def compare_model(config_path, args):
  import jax

  import fatq
  from fatq import export as E
  from fatq import models
  from fatq.data import imagenet
  from fatq.data.paths import data_root

  cfg = runpy.run_path(config_path)["get_config"]()
  name = cfg.name
  print(f"== {name}", flush=True)
  model, params, _ = models.load(cfg.model)
  offset = 1 if int(cfg.model.num_classes) == 1001 else 0
  d = cfg.data
  val = imagenet.val_set(d.preprocessing, int(d.image_size), offset, limit=args.limit or None)
  calib = imagenet.unlabeled_set(d.preprocessing, int(d.image_size), limit=args.calib).images
  images, labels = val.images, val.labels
  rows = []
  fl = E.float_function(model, params, images[:1])
  row, float_logits = evaluate_tflite(f"{name} float32", E.convert_float(fl), images, labels, args.threads,
                                      dict(method="float"))
  rows.append(row)
  row, _ = evaluate_tflite(f"{name} TFLite PTQ int8", E.convert_ptq(fl, calib), images, labels, args.threads,
                           dict(method="tflite_ptq", calibration_images=len(calib)))
  rows.append(row)
  quant = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(8, per_channel=True), fatq.QuantSpec.fat(8, symmetric=False))
  qmodel = models.build(cfg.model, quant)
  workdir = getattr(args, f"workdir_{name.replace('.', '_')}", None)
  if workdir:
    state = load_checkpoint(workdir)
    variables = {"params": state["params"], "quant_stats": state["quant_stats"], "quant": state.get("quant", {})}
    method = f"fatq export (fine-tuned: {workdir})"
  else:
    stats = fatq.calibrate(qmodel, params, [calib[i:i + 25] for i in range(0, len(calib), 25)])
    variables = {"params": params, "quant_stats": stats, "quant": fatq.init_thresholds(qmodel, params, stats, calib[:1])}
    method = "fatq export (calibrated, FAT factors at init: not fine-tuned)"
  ex = E.Exported(qmodel, variables, images[:1])
  apply = jax.jit(lambda x: qmodel.apply(variables, x))
  jax_logits = np.concatenate([np.asarray(apply(images[i:i + 50])) for i in range(0, len(images), 50)])
  row, lite_logits = evaluate_tflite(f"{name} fatq int8", ex.convert("int8", "int8"), images, labels, args.threads,
                                     dict(method=method, calibration_images=len(calib)))
  step = E.TFLiteModel(ex.convert("int8", "int8")).output_step
  row.update(jax_fake_quant_top1=float(np.mean(jax_logits.argmax(1) == labels)),
             agreement_with_jax=float(np.mean(jax_logits.argmax(1) == lite_logits.argmax(1))),
             max_logit_diff_steps=float(np.max(np.abs(jax_logits - lite_logits)) / step))
  rows.append(row)
  if offset == 1 and args.qat:
    qat = Path(data_root()) / QAT
    if qat.exists():
      row, _ = evaluate_tflite("Google QAT MobileNet v2 1.0 uint8 (reference)", qat.read_bytes(), images, labels,
                               args.threads, dict(method="google_qat_reference"))
      rows.append(row)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", nargs="+", default=["configs/mobilenet_v1_0.75.py", "configs/mobilenet_v2_1.0.py"])
  ap.add_argument("--calib", type=int, default=100, help="calibration / representative images (unlabeled pool)")
  ap.add_argument("--limit", type=int, default=0, help="validation images (0 = all 1000)")
  ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
  ap.add_argument("--no-qat", dest="qat", action="store_false")
  ap.add_argument("--workdir_mobilenet_v1_0_75", default=None, help="fine-tuned finetune.py row dir (has checkpoint/)")
  ap.add_argument("--workdir_mobilenet_v2_1_0", default=None)
  ap.add_argument("--out", default="runs/compare_tflite/results.json")
  args = ap.parse_args()
  rows = []
  for c in args.configs:
    rows += compare_model(c, args)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(dict(rows=rows, args=vars(args)), indent=2))
  print(f"\n{'model':<48} {'top-1':>7} {'size KB':>9} {'1 thr ms':>9} {'2 thr ms':>9}  agree/JAX")
  for r in rows:
    agree = f"{100 * r['agreement_with_jax']:.1f}%" if "agreement_with_jax" in r else ""
    print(f"{r['model']:<48} {100 * r['top1']:>6.2f}% {r['size_kb']:>9.1f} {r.get('latency_ms_1t', 0):>9.2f} "
          f"{r.get('latency_ms_2t', 0):>9.2f}  {agree}")
  print(f"\nresults: {args.out}")


if __name__ == "__main__":
  main()
