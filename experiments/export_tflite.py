"""Export a fine-tuned fatq row to TensorFlow Lite: model.tflite (full integer) + thresholds.json (TFLite terms).

    python experiments/export_tflite.py --workdir runs/lenet5_mnist [--row W8A8-channel-sym] [--scheme int8]
        [--input_type int8|uint8|float32] [--output_type int8|uint8|float32] [--out DIR]

Reads WORKDIR/results.json (the experiment config, written by experiments/finetune.py) and the orbax checkpoint
WORKDIR/rows/<row>/checkpoint ({'params', 'quant_stats', 'quant'}); rebuilds the model from the config and the row's
quantization rules, and writes to WORKDIR/rows/<row>/tflite (or --out). See fatq/export.py for the schemes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def rebuild(cfg, row):
  from fatq import experiment
  if cfg.model.name == "lenet5":
    from fatq.models import LeNet5
    model, shape = LeNet5(num_classes=int(cfg.model.get("num_classes", 10))), (1, 28, 28, 1)
  else:
    from fatq import models
    model = models.build(cfg.model)
    size = int(cfg.model.get("image_size", 224))
    shape = (1, size, size, 3)
  return model.clone(quant=experiment.quant_config(row, experiment.base_rules(cfg))), np.zeros(shape, np.float32)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--row", default=None, help="row name (default: the only fine-tuned row)")
  ap.add_argument("--scheme", default="int8", choices=["int8", "uint8"])
  ap.add_argument("--input_type", default="int8", choices=["int8", "uint8", "float32"])
  ap.add_argument("--output_type", default="int8", choices=["int8", "uint8", "float32"])
  ap.add_argument("--asymmetric_weights", default="refuse", choices=["refuse", "symmetrize"])
  ap.add_argument("--config", default=None, help="config file, when WORKDIR/results.json is not there (yet)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()

  import ml_collections

  from fatq import experiment
  from fatq.export import ExportError, export_tflite

  results_path = os.path.join(args.workdir, "results.json")
  if os.path.exists(results_path):
    cfg = ml_collections.ConfigDict(json.load(open(results_path))["config"])
  elif args.config:
    import runpy
    cfg = runpy.run_path(args.config)["get_config"]()
  else:
    sys.exit(f"error: {results_path} not found: run experiments/finetune.py with this --workdir first "
             "(or pass --config)")
  rows = {experiment.row_name(r): r for r in cfg.rows}
  done = sorted(r for r in rows if os.path.isdir(os.path.join(args.workdir, "rows", r, "checkpoint")))
  name = args.row or (done[0] if len(done) == 1 else None)
  if name is None or name not in rows:
    sys.exit(f"error: choose --row among the fine-tuned rows {done}")
  model, sample = rebuild(cfg, rows[name])
  variables = experiment.load_variables(os.path.join(args.workdir, "rows", name, "checkpoint"))
  out = args.out or os.path.join(args.workdir, "rows", name, "tflite")
  try:
    export_tflite(model, variables, sample, out, scheme=args.scheme, input_type=args.input_type,
                  output_type=args.output_type, asymmetric_weights=args.asymmetric_weights)
  except ExportError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
