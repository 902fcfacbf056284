"""FAT fine-tuning of mnasnet_1.3 on the unlabeled ImageNet images (paper Tables 1-2 rows; see configs/imagenet_fat.py).

    python experiments/finetune.py --config configs/mnasnet_1.3_fat.py --workdir runs/mnasnet_1.3_fat
    python experiments/finetune.py --config configs/mnasnet_1.3_fat.py:cpu --workdir runs/mnasnet_1.3_fat_cpu
    python experiments/finetune.py --config configs/mnasnet_1.3_fat.py:quick --workdir runs/mnasnet_1.3_quick
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import imagenet_fat  # noqa: E402  (configs are plain files, not a package)


def get_config(variant=None):
  return imagenet_fat.fat_config("mnasnet_1.3.py", variant)
