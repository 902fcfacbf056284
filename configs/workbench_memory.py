"""Memory model of qat-edge-survey.txt for the shipped models: inference ``N_p b_p + N_a b_a`` (largest activation)
and training (32-bit latent parameters + optimizer state + all activations of a batch) for several weight /
activation bit widths (act 0 = the survey's max(b_p, 4)).

    python experiments/sweep.py --config configs/workbench_memory.py --workdir runs/workbench_memory
"""

import ml_collections


def get_config(arg=None):
  if arg not in (None, '', 'quick'):
    raise ValueError(f"unknown config variant {arg!r}; use '', 'quick'")
  c = ml_collections.ConfigDict()
  c.experiment = "memory"
  c.models = ("lenet5", "mobilenet_v1_0.25", "mobilenet_v1_0.75", "mobilenet_v2_1.0", "mnasnet_1.0", "mnasnet_1.3")
  c.settings = ((32, 32), (8, 8), (4, 8), (4, 4), (3, 3), (2, 0))
  c.batch_size = 32
  c.optimizer_slots = 1  # the survey's "~parameters"; 2 for Adam
  if arg == "quick":
    c.models = ("lenet5",)
  return c
