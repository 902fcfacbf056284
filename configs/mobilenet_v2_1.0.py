"""MobileNet v2 1.0: the int8 post-training-quantized TFLite file dequantized (the closest float MobileNet v2
available here), 1001 classes. ``--config.model.checkpoint=.../mobilenet_v2_1.0_224_qat_uint8.tflite`` for the QAT one.

    python experiments/evaluate.py --config configs/mobilenet_v2_1.0.py --workdir runs/eval_mobilenet_v2_1.0
"""

import os

import ml_collections

from fatq.data.paths import data_root


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "mobilenet_v2_1.0"
  c.seed = 0
  c.model = dict(name="mobilenet_v2", width=1.0, num_classes=1001, checkpoint=os.path.join(data_root(), 'models/mobilenet_v2_1.0_224_ptq_int8.tflite'), checkpoint_format="tflite",
                 image_size=224, impl="lax", checkpoint_hint='')
  # images from a folder, or from tfds when tfds_name is set (configs/imagenet_fat.py)
  c.data = dict(val_dir="", unlabeled_dir="", tfds_name="", tfds_data_dir="", manual_dir="",
                tfds_eval_split="validation", preprocessing="fat", image_size=224, cache_dir="", limit=0)
  c.eval_batch_size = 50
  return c
