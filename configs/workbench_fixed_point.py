"""Fixed-point word-width sweep on LeNet-5 MNIST (TensorQuant): every layer output in fixed point Q<W, F = W/2>,
intrinsic (every product and partial sum inside the layer quantized) vs extrinsic (layer outputs only), nearest vs
stochastic rounding; relative accuracy to the float model.

    python experiments/sweep.py --config configs/workbench_fixed_point.py --workdir runs/workbench_fixed_point
"""

import ml_collections


def get_config(arg=None):
  if arg not in (None, '', 'quick'):
    raise ValueError(f"unknown config variant {arg!r}; use '', 'quick'")
  c = ml_collections.ConfigDict()
  c.experiment = "fixed_point"
  c.seed = 0
  c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=3, num_eval=2000)]
  c.placements = ("extrinsic", "intrinsic")
  c.roundings = ("nearest", "stochastic")
  c.word_bits = (4, 6, 8, 10, 12, 16)
  c.frac_bits = "half"  # F = W // 2 (TensorQuant's rounding experiment); or an integer
  c.extra_points = ()  # e.g. ('input',) to quantize the image too
  c.eval_batch_size = 500
  if arg == "quick":
    c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=1, float_limit=2000, num_eval=200)]
    c.word_bits = (4, 8)
  return c
