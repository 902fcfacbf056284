"""MobileNet v1 0.25 (TF-slim float TFLite), 1001 classes.

    python experiments/evaluate.py --config configs/mobilenet_v1_0.25_tflite.py  # runs/eval_mobilenet_v1_0.25_tflite
"""

import os

import ml_collections

from fatq.data import imagenet
from fatq.data.paths import data_root


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "mobilenet_v1_0.25_tflite"
  c.seed = 0
  c.model = dict(name="mobilenet_v1", width=0.25, num_classes=1001, image_size=224, impl="lax",
                 checkpoint_format="tflite",
                 checkpoint=os.path.join(data_root(), "models", "mobilenet_v1_0.25_224_float.tflite"))
  c.data = imagenet.data_config(preprocessing="fat", image_size=224)  # folders, or tfds when data.tfds_name is set
  c.eval_batch_size = 50
  return c
