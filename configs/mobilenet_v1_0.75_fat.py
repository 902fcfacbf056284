"""FAT fine-tuning of mobilenet_v1_0.75 on the unlabeled ImageNet images (paper Tables 1-2 rows; see
configs/imagenet_fat.py).

    python experiments/finetune.py --config configs/mobilenet_v1_0.75_fat.py --workdir runs/mobilenet_v1_0.75_fat
    python experiments/finetune.py --config configs/mobilenet_v1_0.75_fat.py:cpu --workdir runs/mobilenet_v1_0.75_fat_cpu
    python experiments/finetune.py --config configs/mobilenet_v1_0.75_fat.py:quick --workdir runs/mobilenet_v1_0.75_quick
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import imagenet_fat  # noqa: E402  (configs are plain files, not a package)


def get_config(variant=None):
  return imagenet_fat.fat_config("mobilenet_v1_0.75.py", variant)
