"""Float top-1 / top-5 of a pre-trained ImageNet model on a labeled image folder; prints a table, writes results.json.

    python experiments/evaluate.py --config configs/mobilenet_v1_0.75.py [--workdir runs/eval_mobilenet_v1_0.75]

Any config value can be overridden, e.g. ``--config.model.checkpoint=/path/mnasnet_1.0_224.tflite`` or
``--config.data.val_dir=/path/to/labeled/folder``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from fatq import cli

config_flags.DEFINE_config_file("config", None, "Model config file (configs/*.py).", lock_config=False)
flags.DEFINE_string("workdir", None, "Directory for results.json (default runs/eval_<model>).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def evaluate(cfg, workdir: str) -> dict:
  import numpy as np

  from fatq import experiment, models, training
  from fatq.data import imagenet

  experiment.check_config(cfg)  # eval_batch_size, data.val_limit, ... before the checkpoint and images are read
  t0 = time.perf_counter()
  model, params, report = models.load(cfg.model)
  print(report.summary())
  t_load = time.perf_counter() - t0
  offset = 1 if int(cfg.model.num_classes) == 1001 else 0
  d = cfg.data
  t0 = time.perf_counter()
  val = imagenet.evaluation_set(d, label_offset=offset, limit=d.get("val_limit") or None)
  t_data = time.perf_counter() - t0
  experiment.check_labels(val.labels - offset, offset, int(cfg.model.num_classes))  # not 0 % without a word
  if val.skipped:
    print(f"skipped {len(val.skipped)} unreadable image(s)")
  t0 = time.perf_counter()
  # data parallel over every visible device, as finetune.py's evaluations (the last batch padded)
  logits = training.predict(model, {"params": params}, val.images, int(cfg.get("eval_batch_size", 50)))
  t_eval = time.perf_counter() - t0
  pred = logits.argmax(-1)
  top5 = np.argsort(-logits, -1)[:, :5]
  row = dict(method="float", weight_bits=32, act_bits=32, granularity="tensor", symmetric=True,
             top1=float(np.mean(pred == val.labels)), top5=float(np.mean(np.any(top5 == val.labels[:, None], -1))),
             agreement=1.0)
  results = dict(model=cfg.model.name, dataset=imagenet.evaluation_source(d), rows=[row],
                 config=json.loads(cfg.to_json()), load_report={k: v for k, v in report.to_dict().items()
                                                                 if k != "tensors"},
                 num_images=len(val.images), skipped_images=len(val.skipped),
                 timings=dict(load=round(t_load, 1), data=round(t_data, 1), eval=round(t_eval, 1)))
  experiment.atomic_write_json(os.path.join(workdir, "results.json"), results)
  return results


def main(argv):
  del argv
  cfg = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("runs", f"eval_{cfg.get('name', cfg.model.name)}")
  cli.refuse_a_finetune_workdir(workdir)  # both before minutes of loading and evaluation
  cli.make_workdir(workdir)
  try:
    r = evaluate(cfg, workdir)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"\n{'model':<28} {'images':>6} {'top-1':>7} {'top-5':>7}")
  row = r["rows"][0]
  print(f"{cfg.get('name', cfg.model.name):<28} {r['num_images']:>6} {100 * row['top1']:>6.2f}% "
        f"{100 * row['top5']:>6.2f}%")
  print(f"\nresults: {os.path.join(workdir, 'results.json')}  (timings {r['timings']})")


if __name__ == "__main__":
  cli.run(main)  # app.run(main); a bad flag or config key ends in one line
