"""Data-free post-training weight quantization, 2..8 bits: uniform asymmetric, uniform symmetric, power of two
(bit-efficient-quantization.txt Tables 1, 3, 5) on LeNet-5 MNIST, LeNet-5 Fashion-MNIST and MobileNet v1 0.75
(ImageNet validation images); activations stay float; model size raw / gzip / lzma.

    python experiments/sweep.py --config configs/workbench_datafree.py --workdir runs/workbench_datafree

``:quick`` is a tiny smoke run (LeNet-5 on a slice of MNIST, 2 bit widths). ``:mobilenet_per_channel`` repeats the
MobileNet sweep with one range per output channel (per-tensor weight ranges of a batch-norm-folded MobileNet v1
lose nearly all accuracy even at 8 bits, as Krishnamoorthi's whitepaper reports for per-layer weight-only PTQ).
"""

import ml_collections


def get_config(arg=None):
  if arg not in (None, '', 'quick', 'mobilenet_per_channel'):
    raise ValueError(f"unknown config variant {arg!r}; use '', 'quick', 'mobilenet_per_channel'")
  c = ml_collections.ConfigDict()
  c.experiment = "datafree"
  c.seed = 0
  c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=3, num_eval=10000),
             dict(model="lenet5", dataset="fashion_mnist", float_epochs=3, num_eval=10000),
             dict(model="mobilenet_v1_0.75", num_eval=200, impl="fast")]
  c.methods = ("asym", "sym", "pot")
  c.bits = (8, 7, 6, 5, 4, 3, 2)
  c.per_channel = False  # per tensor, as the paper
  c.eval_batch_size = 250
  if arg == "mobilenet_per_channel":
    c.tasks = [c.tasks[2]]
    c.per_channel = True
  elif arg == "quick":
    c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=1, float_limit=2000, num_eval=500)]
    c.bits = (8, 2)
  return c
