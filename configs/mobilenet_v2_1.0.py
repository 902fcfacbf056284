"""MobileNet v2 1.0: the int8 post-training-quantized TFLite file dequantized (the closest float MobileNet v2
available here), 1001 classes. ``--config.model.checkpoint=.../mobilenet_v2_1.0_224_qat_uint8.tflite`` for the QAT one.

    python experiments/evaluate.py --config configs/mobilenet_v2_1.0.py --workdir runs/eval_mobilenet_v2_1.0
"""

import os

import ml_collections

from fatq.data import imagenet
from fatq.data.paths import data_root


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "mobilenet_v2_1.0"
  c.seed = 0
  c.model = dict(name="mobilenet_v2", width=1.0, num_classes=1001, image_size=224, impl="lax",
                 checkpoint_format="tflite",
                 checkpoint=os.path.join(data_root(), "models", "mobilenet_v2_1.0_224_ptq_int8.tflite"))
  c.data = imagenet.data_config(preprocessing="fat", image_size=224)  # folders, or tfds when data.tfds_name is set
  c.eval_batch_size = 50
  return c
