"""Bit-efficiency statistics of every weight layer (occupancy of the levels, entropy / bits, range kept, octaves per
bit, SQNR, per-channel quartiles before and after) for uniform asymmetric, symmetric and power-of-two weights at
2..8 bits; histograms (methods; 8..2 bits) and per-channel quartile plots as in bit-efficient-quantization.txt
Figures 1-2. LeNet-5 MNIST and MobileNet v1 0.75 (data-free: weights only).

    python experiments/sweep.py --config configs/workbench_bit_efficiency.py --workdir runs/workbench_bit_efficiency
"""

import ml_collections


def get_config(arg=None):
  if arg not in (None, '', 'quick'):
    raise ValueError(f"unknown config variant {arg!r}; use '', 'quick'")
  c = ml_collections.ConfigDict()
  c.experiment = "bit_efficiency"
  c.seed = 0
  c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=3, quartile_layer="conv2"),
             dict(model="mobilenet_v1_0.75", quartile_layer="block9/pointwise")]
  c.methods = ("asym", "sym", "pot")
  c.bits = (8, 6, 4, 3, 2)
  c.per_channel = False
  c.quartile_bits = 4
  c.quartile_channels = 32
  if arg == "quick":
    c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=1, float_limit=2000, quartile_layer="conv2")]
  return c
