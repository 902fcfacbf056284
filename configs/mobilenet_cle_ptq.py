"""Scalar-mode (per-tensor) 8-bit post-training quantization with and without data-free quantization (cross-layer
equalization + bias correction, fatq/equalize.py; issue 4), on the layout of configs/imagenet_fat.py.

Rows, each symmetric and asymmetric: plain PTQ; ``-cle-nobc`` (equalization alone); ``-cle`` (equalization + bias
correction); ``-cle-relu`` (the same with ReLU instead of ReLU6, the paper's practice and the form TFLite exports;
see fatq/equalize.py). The ``equalized_float`` entry of an equalized row in results.json scores its float model.
No fine-tuning (fat=False).

    python experiments/finetune.py --config configs/mobilenet_cle_ptq.py:mobilenet_v1_0.75 --workdir runs/cle_mobilenet_v1_0.75
    python experiments/finetune.py --config configs/mobilenet_cle_ptq.py:mobilenet_v2_1.0 --workdir runs/cle_mobilenet_v2_1.0
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import imagenet_fat  # noqa: E402  (configs are plain files, not a package)

MODELS = ("mobilenet_v1_0.75", "mobilenet_v2_1.0")


def rows():
  out = []
  for dfq in ({}, dict(equalize=True, bias_correction=False), dict(equalize=True), dict(equalize="relu")):
    for symmetric in (True, False):
      out.append(dict(weight_bits=8, act_bits=8, per_channel=False, symmetric=symmetric, fat=False, **dfq))
  return out


def get_config(variant=None):
  if variant not in MODELS:
    raise ValueError(f"choose the model as the config variant: one of {MODELS} (got {variant!r})")
  c = imagenet_fat.fat_config(f"{variant}.py", None)
  c.rows = rows()
  return c
