"""Quantization workbench experiments: data-free sweeps, fixed point, FAT vs LSQ vs PTQ, sensitivity, bit efficiency,
memory model (fatq.workbench.experiments).

    python experiments/sweep.py --config configs/workbench_datafree.py --workdir runs/workbench_datafree

Writes ``WORKDIR/results.json`` (experiment, model, dataset, rows, config, timings) and the experiment's plot(s)
(PNG) beside it, and prints a table. Any config value can be overridden, e.g. ``--config.bits='(4, 8)'``.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from fatq import cli

config_flags.DEFINE_config_file("config", None, "Workbench config file (configs/workbench_*.py).", lock_config=False)
flags.DEFINE_string("workdir", None, "Directory for results.json and plots (created if missing).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from fatq.workbench import experiments

  cli.refuse_a_finetune_workdir(FLAGS.workdir)
  cli.make_workdir(FLAGS.workdir)
  try:
    results, text = experiments.run(FLAGS.config, FLAGS.workdir, log=lambda s: print(s, flush=True))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print()
  print(text)
  print(f"\nresults: {os.path.join(FLAGS.workdir, 'results.json')}  ({results['timings']['total']} s)")


if __name__ == "__main__":
  cli.run(main)  # app.run(main); a bad flag or config key ends in one line
