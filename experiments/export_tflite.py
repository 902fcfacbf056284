"""Export a fine-tuned fatq row to TensorFlow Lite and check it: model.tflite (full integer) + thresholds.json (TFLite
terms) + export_report.json.

    python experiments/export_tflite.py --workdir runs/lenet5_mnist --row W8A8-channel-symW-asymA
    python experiments/export_tflite.py --workdir runs/mobilenet_v1_0.75_quick [--scheme int8|uint8]
        [--input_type int8|uint8|float32] [--output_type int8|uint8|float32] [--out DIR]

Reads WORKDIR/results.json (the experiment config, written by experiments/finetune.py), the float model and the
evaluation images as finetune.py does (fatq.tasks.prepare), and the orbax checkpoint WORKDIR/rows/<row>/checkpoint;
writes to WORKDIR/rows/<row>/tflite (or --out). The report (printed, and saved as export_report.json) checks every
tensor's scale / zero point read back from the file against thresholds.json, compares the interpreter with the JAX
fake-quant model on the evaluation images (top-1, agreement, max logit difference in output steps), evaluates the file
with the interpreter's integer arithmetic in JAX (fatq.integer: XNNPACK's on all images, the reference kernels' on
--reference_images) and gives file size and interpreter latency beside the float model's. See fatq/export.py and
docs/export.md for the rules.
"""

from __future__ import annotations

import argparse
import sys


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--row", default=None, help="row name (default: the only fine-tuned row)")
  ap.add_argument("--scheme", default="int8", choices=["int8", "uint8"])
  ap.add_argument("--input_type", default=None, choices=["int8", "uint8", "float32"], help="default: the scheme's")
  ap.add_argument("--output_type", default=None, choices=["int8", "uint8", "float32"], help="default: the scheme's")
  ap.add_argument("--asymmetric_weights", default="refuse", choices=["refuse", "symmetrize"])
  ap.add_argument("--float_pool", action="store_true",
                  help="keep the global average pool's output unquantized in the JAX model's float-arithmetic "
                       "evaluation (eval_float_arithmetic); the file, and the integer-arithmetic comparison that "
                       "decides the checks, round it as TFLite does")
  ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="interpreter threads for the latency")
  ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N evaluation images only (0: all)")
  ap.add_argument("--reference_images", type=int, default=200,
                  help="images on which the JAX integer model is checked against TFLite's (slow) reference kernels")
  ap.add_argument("--no_integer", action="store_true", help="skip the JAX integer evaluation (fatq.integer)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  if min(args.threads) < 1:
    ap.error(f"--threads {min(args.threads)}: interpreter threads must be >= 1")
  for flag in ("limit", "reference_images"):
    if getattr(args, flag) < 0:
      ap.error(f"--{flag} {getattr(args, flag)}: must be >= 0 (a count of images)")

  from fatq import experiment, tasks
  from fatq.export import ExportError, export_row, fine_tuned_row

  try:
    cfg = experiment.run_config(args.workdir)
    fine_tuned_row(cfg, args.workdir, args.row)  # a wrong --row stops before the data is read
    model, params, data = tasks.prepare(cfg, args.workdir, progress=False)
    if args.limit:
      data.eval_images, data.eval_labels = data.eval_images[:args.limit], data.eval_labels[:args.limit]
    report = export_row(cfg, model, params, data, args.workdir, args.row, args.out, scheme=args.scheme,
                        input_type=args.input_type, output_type=args.output_type,
                        asymmetric_weights=args.asymmetric_weights, tie_pool_grid=not args.float_pool,
                        threads=tuple(args.threads), integer_check=not args.no_integer,
                        reference_images=args.reference_images)
  except (ExportError, FileNotFoundError, ValueError) as e:  # ValueError: a damaged row checkpoint, bad data
    sys.exit(f"error: {e}")
  print(f"\nreport: {report['files']['report']}")
  mismatches = report["readback"]["mismatches"]
  if mismatches:
    sys.exit(f"error: {len(mismatches)} tensor(s) of model.tflite do not have the scale / zero point of "
             f"thresholds.json (e.g. {mismatches[0]}): the file is kept for inspection, but it is not the fine-tuned "
             "model")


if __name__ == "__main__":
  from fatq import cli
  cli.tune_malloc()  # restarts the process with malloc tuned for XLA:CPU (huge pages, buffers kept mapped)
  cli.interruptible(main)()
