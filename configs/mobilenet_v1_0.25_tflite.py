"""MobileNet v1 0.25 (TF-slim float TFLite), 1001 classes.

    python experiments/evaluate.py --config configs/mobilenet_v1_0.25_tflite.py --workdir runs/eval_mobilenet_v1_0.25_tflite
"""

import os

import ml_collections

from fatq.data.paths import data_root


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "mobilenet_v1_0.25_tflite"
  c.seed = 0
  c.model = dict(name="mobilenet_v1", width=0.25, num_classes=1001, checkpoint=os.path.join(data_root(), 'models/mobilenet_v1_0.25_224_float.tflite'), checkpoint_format="tflite",
                 image_size=224, impl="lax", checkpoint_hint='')
  # images from a folder, or from tfds when tfds_name is set (configs/imagenet_fat.py)
  c.data = dict(val_dir="", unlabeled_dir="", tfds_name="", tfds_data_dir="", manual_dir="",
                tfds_eval_split="validation", preprocessing="fat", image_size=224, cache_dir="", limit=0)
  c.eval_batch_size = 50
  return c
