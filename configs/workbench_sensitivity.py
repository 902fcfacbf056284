"""Per-layer sensitivity: accuracy when one layer at a time (its weights, symmetric, and its output, asymmetric;
min/max calibration on 100 images) is quantized to k bits and the rest stays float; sorted by drop.
LeNet-5 MNIST at 2, 3 and 4 bits (weights per tensor); MobileNet v1 0.75 at 4 bits on 200 validation images with
weights per output channel (per-tensor weight ranges of the batch-norm-folded depthwise layers lose nearly all
accuracy even at 8 bits, see the data-free sweep, so a per-tensor ranking would only repeat that).

    python experiments/sweep.py --config configs/workbench_sensitivity.py --workdir runs/workbench_sensitivity
"""

import ml_collections


def get_config(arg=None):
  if arg not in (None, '', 'quick'):
    raise ValueError(f"unknown config variant {arg!r}; use '', 'quick'")
  c = ml_collections.ConfigDict()
  c.experiment = "sensitivity"
  c.seed = 0
  c.quantize_output = True
  c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=3, num_eval=10000, bits=(2, 3, 4),
                  eval_batch_size=1000),
             dict(model="mobilenet_v1_0.75", num_eval=200, bits=(4,), per_channel=True, impl="fast",
                  eval_batch_size=50)]
  if arg == "quick":
    c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=1, float_limit=2000, num_eval=300, bits=(2,),
                    eval_batch_size=100)]
  return c
