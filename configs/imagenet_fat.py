"""Shared layout of the ImageNet FAT fine-tuning configs (``configs/<model>_fat.py``); not a config itself.

Variants (``--config configs/<model>_fat.py:VARIANT``):
  ``''``      the FAT paper's Tables 1 and 2 at 8 bits (vector ("channel") and scalar ("tensor") mode, symmetric
              and asymmetric thresholds, and TFLite's int8 scheme: vector mode, symmetric weights, asymmetric
              activations), each as PTQ then FAT, with tracked bias correction and learned bias offsets
              (``bias_correction='tracked'``, ``learn_biases``); W4A8 in vector mode the same way, with min/max
              weight ranges and with MSE weight ranges (``weight_calibration='mse'``); scalar mode after
              cross-layer equalization with tracked bias correction (``equalize``, fatq.equalize). Two epochs
              over the 800 training images per row;
  ``cpu``     the same rows with one epoch (25 steps of 32 images per row);
  ``paper``   the paper's rows as the paper trains them, thresholds alone, two epochs (with
              ``--config.fat.epochs=1``, the thresholds-alone ``cpu`` tables of docs/results.md);
  ``quick``   one row, thresholds alone (TFLite's int8 scheme), one epoch;
  ``actmse``  activation ranges by min/max against MSE (``act_calibration='mse'``), each row twice: PTQ in
              vector mode at W8A8, W4A8 (MSE weight ranges), W8A6 and W8A4 and in scalar mode at W8A8 (TFLite's
              int8 scheme, bias correction), then FAT at W8A4 as the default rows train;
  ``actpercentile``  the same rows once, activation ranges that keep 99.99 % of the values
              (``act_calibration='percentile'``);
  ``actentropy``  the same rows once, activation ranges of least KL divergence (``act_calibration='entropy'``).
"""

import os

import ml_collections

from fatq import cli
from fatq.data import imagenet


def paper_rows():
  """The FAT paper's Tables 1 and 2 at 8 bits, thresholds alone: vector and scalar mode, symmetric and asymmetric,
  and TFLite's int8 scheme (per-channel symmetric weights, asymmetric activations: the row to export)."""
  rows = [dict(weight_bits=8, act_bits=8, per_channel=per_channel, symmetric=symmetric, fat=True)
          for per_channel in (True, False) for symmetric in (True, False)]
  rows.append(dict(weight_bits=8, act_bits=8, per_channel=True, symmetric=True, act_symmetric=False, fat=True))
  return rows


def default_rows():
  # The paper's rows, and W4A8 in vector mode with min/max and with MSE weight ranges, each with every layer's bias
  # corrected for its weight grid, the correction tracked through fine-tuning, and learned bias offsets: over five
  # seeds the 8-bit vector rows measured (sym, TFLite int8) average within 0.4 points of float top-1 at the default
  # budget (about one standard error on the 1000 validation images; five-seed table in the README), scalar mode and
  # W4A8 become usable without equalization (PTQ top-1 without the correction: 0.8-8 % and 0.1-0.4 %;
  # docs/results.md).
  w4a8 = dict(weight_bits=4, act_bits=8, per_channel=True, symmetric=True, act_symmetric=False, fat=True)
  rows = [dict(row, bias_correction="tracked", learn_biases=True)
          for row in paper_rows() + [w4a8, dict(w4a8, weight_calibration="mse")]]
  # scalar mode after cross-layer equalization and bias correction, the correction tracked through fine-tuning;
  # learned offsets here lowered the held-out RMSE by 8-15 % but moved top-1 only within its noise (docs/results.md)
  rows += [dict(weight_bits=8, act_bits=8, per_channel=False, symmetric=symmetric, equalize=True,
                bias_correction="tracked", fat=True) for symmetric in (True, False)]
  return rows


def act_calibration_rows(method: str = "mse"):
  """Pairs of rows, activation ranges by min/max and by ``method``: PTQ (TFLite's int8 scheme with bias correction)
  at 8, 6 and 4 activation bits and with 4-bit MSE weights in vector mode, at W8A8 in scalar mode; FAT at W8A4."""
  int8 = dict(weight_bits=8, act_bits=8, per_channel=True, symmetric=True, act_symmetric=False, bias_correction=True)
  ptq = [int8, dict(int8, per_channel=False), dict(int8, weight_bits=4, weight_calibration="mse"),
         dict(int8, act_bits=6), dict(int8, act_bits=4)]
  fat = [dict(int8, act_bits=4, bias_correction="tracked", learn_biases=True, fat=True)]
  return [r for row in ptq + fat for r in (row, dict(row, act_calibration=method))]


VARIANTS = ("", "cpu", "paper", "quick", "actmse", "actpercentile", "actentropy")


def fat_config(model_config_file: str, variant: str | None):
  if (variant or "") not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}; use one of {', '.join(map(repr, VARIANTS))}")
  base = cli.load_config(os.path.join(os.path.dirname(__file__), model_config_file))
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = base.model.to_dict()
  c.model.impl = "fast"  # training and evaluation use the fast CPU convolutions; export uses 'lax'
  # Unlabeled pool: 100 calibration images, 100 held-out images (distillation loss), the rest for training.
  # Images from folders (default: the embedded ImageNet subset), or from tfds when tfds_name is set: e.g.
  # --config.data.tfds_name=imagenet2012 --config.data.manual_dir=/folder/with/ILSVRC2012_img_{train,val}.tar
  c.data = imagenet.data_config(base.data.preprocessing, base.data.image_size, name="imagenet", num_train=0,
                                num_calibration=100, num_holdout=100)
  c.calibration = dict(batch_size=50)
  c.input_bits = 8
  c.fat = dict(epochs=2, batch_size=32, loss="rmse", schedule="cosine_restarts", lr=2e-3, lr_min=1e-5,
               restart_period=25, eval_every=25, checkpoint_every=10, seed=0, per_device_batch_size=0,
               # True: clip the factors back into their bounds after each step (projected gradient descent); False,
               # the paper's way, leaves a factor that a step carried past a bound there, without gradient
               project_factors=False)
  c.rows = {"paper": paper_rows(), "actmse": act_calibration_rows(),
            "actpercentile": act_calibration_rows("percentile")[1::2],
            "actentropy": act_calibration_rows("entropy")[1::2]}.get(variant, default_rows())
  c.eval_batch_size = 50
  if variant == "cpu":
    c.fat.epochs = 1
  if variant == "quick":
    c.fat.epochs = 1
    c.rows = paper_rows()[-1:]
  return c
