"""MobileNet v1 0.75 (keras.applications weights, TensorFlow.js layers format), 1000 classes.

    python experiments/evaluate.py --config configs/mobilenet_v1_0.75.py --workdir runs/eval_mobilenet_v1_0.75
"""

import os

import ml_collections

from fatq.data import imagenet
from fatq.data.paths import data_root


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "mobilenet_v1_0.75"
  c.seed = 0
  c.model = dict(name="mobilenet_v1", width=0.75, num_classes=1000, image_size=224, impl="lax",
                 checkpoint_format="tfjs",
                 checkpoint=os.path.join(data_root(), "models", "mobilenet_v1_0.75_224_keras_tfjs"))
  c.data = imagenet.data_config(preprocessing="fat", image_size=224)  # folders, or tfds when data.tfds_name is set
  c.eval_batch_size = 50
  return c
