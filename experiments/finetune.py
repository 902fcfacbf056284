"""FAT fine-tuning: float baseline, post-training quantization and learned thresholds, as a table and results.json.

    python experiments/finetune.py --config configs/lenet5_mnist.py --workdir runs/lenet5_mnist [--resume]

Writes ``WORKDIR/results.json`` (config, rows, timings), ``WORKDIR/rows/<row>/metrics.jsonl`` and an orbax checkpoint
of each fine-tuned row (``WORKDIR/rows/<row>/checkpoint``: params, quant_stats, quant).
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from fatq import cli

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results and checkpoints (created if missing).")
flags.DEFINE_bool("resume", False, "Skip the rows already in WORKDIR/results.json.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_bool("export", False, "After the table, export fine-tuned rows to TensorFlow Lite and check them "
                  "(experiments/export_tflite.py; WORKDIR/rows/<row>/tflite).")
flags.DEFINE_enum("export_scheme", "int8", ["int8", "uint8"], "TFLite scheme for --export (see docs/export.md).")
flags.DEFINE_string("export_row", "all", "Rows for --export: 'all' fine-tuned rows, 'best' (highest top-1), or a name.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from fatq import experiment, tasks, training  # after flag parsing: importing JAX/TF is slow

  cfg, workdir = FLAGS.config, FLAGS.workdir
  given = [f"--{name}" for name in ("export_row", "export_scheme") if FLAGS[name].present]
  if given and not FLAGS.export:
    sys.exit(f"error: {' and '.join(given)} choose what --export exports; add --export, or leave them out")
  if FLAGS.export:  # a misspelled row would otherwise be reported after the whole run
    tuned = [experiment.row_name(r) for r in cfg.get("rows", None) or [] if r.get("fat", False)]
    if not tuned:
      sys.exit("error: --export exports fine-tuned rows, and this config has none (no row with fat=True)")
    if FLAGS.export_row not in ("all", "best", *tuned):
      sys.exit(f"error: --export_row {FLAGS.export_row!r} is not a fine-tuned row of this config; its fine-tuned rows: "
               f"{', '.join(tuned)} (or 'all', 'best')")
  cli.make_workdir(workdir)
  t0 = time.perf_counter()
  try:
    if FLAGS.resume:  # before any data or model is loaded
      experiment.check_resume(cfg, workdir)
    model, params, data = tasks.prepare(cfg, workdir, progress=FLAGS.progress)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  try:
    results = experiment.run(cfg, model, params, data, workdir, resume=FLAGS.resume, progress=FLAGS.progress)
  except (experiment.InputError, training.UnrestorableCheckpoint) as e:  # other errors keep their traceback
    sys.exit(f"error: {e}")
  # over every invocation of a resumed run (a resumed row's own seconds count its last invocation only)
  results["timings"]["total"] = round(results["timings"].get("total", 0.0) + time.perf_counter() - t0, 1)
  experiment.atomic_write_json(os.path.join(workdir, "results.json"), results)
  print()
  print(experiment.table(results))
  print(f"\nresults: {os.path.join(workdir, 'results.json')}  ({results['timings']['total']} s)")
  if FLAGS.export:
    export(cfg, model, params, data, workdir, results)


def export(cfg, model, params, data, workdir, results):
  """--export: the same export and checks as experiments/export_tflite.py, for the chosen fine-tuned rows."""
  from fatq.export import ExportError, export_row

  fat = [r for r in results["rows"] if r["method"] == "fat"]
  if FLAGS.export_row == "best":
    fat = sorted(fat, key=lambda r: -r["top1"])[:1]
  elif FLAGS.export_row != "all":
    fat = [r for r in fat if r["name"] == FLAGS.export_row]
  for r in fat:
    print(f"\n== export {r['name']} ({FLAGS.export_scheme})")
    try:
      export_row(cfg, model, params, data, workdir, r["name"], scheme=FLAGS.export_scheme)
    except ExportError as e:  # e.g. a mode the scheme cannot represent: report it, export the other rows
      print(f"{r['name']}: not exported: {e}")


if __name__ == "__main__":
  cli.run(main)  # app.run(main); a bad flag or config key ends in one line
