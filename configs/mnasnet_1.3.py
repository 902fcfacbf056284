"""MnasNet 1.3 (TFLite-hosted mnasnet_1.3_224, mnasnet-b1 blocks), 1001 classes.

    python experiments/evaluate.py --config configs/mnasnet_1.3.py --workdir runs/eval_mnasnet_1.3

The checkpoint is not shipped: pass ``--config.model.checkpoint=/path/to/mnasnet_1.3_224.tflite`` or put the file in
``../shared/data/models/`` ($FATQ_DATA/models). Without it the run stops with an error naming the file.
"""

import os

import ml_collections

from fatq.data import imagenet
from fatq.data.paths import data_root

FILE = "mnasnet_1.3_224.tflite"
URL = "https://storage.googleapis.com/download.tensorflow.org/models/tflite/mnasnet_1.3_224_09_07_2018.tgz"


def _default_checkpoint():
  path = os.path.join(data_root(), "models", FILE)
  return path if os.path.exists(path) else ""


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "mnasnet_1.3"
  c.seed = 0
  c.model = dict(name="mnasnet", width=1.3, num_classes=1001, image_size=224, impl="lax",
                 checkpoint=_default_checkpoint(), checkpoint_format="tflite",
                 checkpoint_hint=f"{FILE} from {URL}; put it in ../shared/data/models/ or pass "
                                 f"--config.model.checkpoint=/path/{FILE}")
  c.data = imagenet.data_config(preprocessing="fat", image_size=224)  # folders, or tfds when data.tfds_name is set
  c.eval_batch_size = 50
  return c
