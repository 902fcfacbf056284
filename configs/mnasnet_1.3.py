"""MnasNet 1.3 (TFLite-hosted mnasnet_1.3_224, mnasnet-b1 blocks), 1001 classes.

    python experiments/evaluate.py --config configs/mnasnet_1.3.py --workdir runs/eval_mnasnet_1.3

The checkpoint is not shipped: pass ``--config.model.checkpoint=/path/to/mnasnet_1.3_224.tflite`` or put the file in
``../shared/data/models/`` ($FATQ_DATA/models). Without it the run stops with an error naming the file.
"""

import os

import ml_collections

from fatq.data.paths import data_root


def _default_checkpoint():
  path = os.path.join(data_root(), "models", "mnasnet_1.3_224.tflite")
  return path if os.path.exists(path) else ""


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "mnasnet_1.3"
  c.seed = 0
  c.model = dict(name="mnasnet", width=1.3, num_classes=1001, checkpoint=_default_checkpoint(), checkpoint_format="tflite",
                 image_size=224, impl="lax", checkpoint_hint='mnasnet_1.3_224.tflite from https://storage.googleapis.com/download.tensorflow.org/models/tflite/mnasnet_1.3_224_09_07_2018.tgz; put it in ../shared/data/models/ or pass --config.model.checkpoint=/path/mnasnet_1.3_224.tflite')
  # images from a folder, or from tfds when tfds_name is set (configs/imagenet_fat.py)
  c.data = dict(val_dir="", unlabeled_dir="", tfds_name="", tfds_data_dir="", manual_dir="",
                tfds_eval_split="validation", preprocessing="fat", image_size=224, cache_dir="", limit=0)
  c.eval_batch_size = 50
  return c
