"""Shared layout of the ImageNet FAT fine-tuning configs (``configs/<model>_fat.py``); not a config itself.

Variants (``--config configs/<model>_fat.py:VARIANT``):
  ``''``      the paper's Tables 1 and 2 at 8 bits: vector ("channel") and scalar ("tensor") mode, symmetric and
              asymmetric thresholds, each as PTQ then FAT; scalar mode again after cross-layer equalization and
              bias correction (``equalize``, fatq.equalize); TFLite's int8 scheme (vector mode, symmetric weights,
              asymmetric activations); W4A8 in vector mode, with min/max weight ranges and with MSE weight ranges,
              tracked bias correction and learned bias offsets (``weight_calibration='mse'``,
              ``bias_correction='tracked'``, ``learn_biases``). Two epochs over the 800 training images per row;
  ``cpu``     the same rows with one epoch (25 steps of 32 images per row): what the README tables were measured
              with on a 2-core CPU;
  ``quick``   one row (vector mode, symmetric weights, asymmetric activations: TFLite's int8 scheme), one epoch.
"""

import importlib.util
import os

import ml_collections


def paper_rows():
  rows = [dict(weight_bits=8, act_bits=8, per_channel=per_channel, symmetric=symmetric, fat=True)
          for per_channel in (True, False) for symmetric in (True, False)]
  # TFLite's int8 scheme (per-channel symmetric weights, asymmetric activations): the row to export
  rows.append(dict(weight_bits=8, act_bits=8, per_channel=True, symmetric=True, act_symmetric=False, fat=True))
  w4a8 = dict(weight_bits=4, act_bits=8, per_channel=True, symmetric=True, act_symmetric=False, fat=True)
  rows.append(w4a8)
  # the same with 4-bit weight ranges clipped for least squared error, biases corrected for them and the correction
  # tracked through fine-tuning, and learned bias offsets: PTQ top-1 0.4 % -> 62.2 % on MobileNet v2, 0.1 % ->
  # 58.6 % on v1; FAT at the default budget 70.6 % and 70.0 % (README)
  rows.append(dict(w4a8, weight_calibration="mse", bias_correction="tracked", learn_biases=True))
  # scalar mode after cross-layer equalization and bias correction, the correction tracked through fine-tuning
  rows += [dict(weight_bits=8, act_bits=8, per_channel=False, symmetric=symmetric, equalize=True,
                bias_correction="tracked", fat=True) for symmetric in (True, False)]
  return rows


def fat_config(model_config_file: str, variant: str | None):
  if variant not in (None, "", "cpu", "quick"):
    raise ValueError(f"unknown config variant {variant!r}; use '', 'cpu' or 'quick'")
  spec = importlib.util.spec_from_file_location("model_config", os.path.join(os.path.dirname(__file__),
                                                                             model_config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = module.get_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = base.model.to_dict()
  c.model.impl = "fast"  # training and evaluation use the fast CPU convolutions; export uses 'lax'
  # Unlabeled pool: 100 calibration images, 100 held-out images (distillation loss), the rest for training.
  c.data = dict(name="imagenet", val_dir="", unlabeled_dir="", preprocessing=base.data.preprocessing,
                image_size=base.data.image_size, cache_dir="", num_train=0, num_calibration=100, num_holdout=100,
                val_limit=0)
  c.calibration = dict(batch_size=50)
  c.input_bits = 8
  c.fat = dict(epochs=2, batch_size=32, loss="rmse", schedule="cosine_restarts", lr=2e-3, lr_min=1e-5,
               restart_period=25, eval_every=25, checkpoint_every=10, seed=0, per_device_batch_size=0)
  c.rows = paper_rows()
  c.eval_batch_size = 50
  if variant == "cpu":
    c.fat.epochs = 1
  if variant == "quick":
    c.fat.epochs = 1
    c.rows = [dict(weight_bits=8, act_bits=8, per_channel=True, symmetric=True, act_symmetric=False, fat=True)]
  return c
