"""LeNet-5 on Fashion-MNIST: float training, post-training quantization and FAT at 8/4/3 bits.

    python experiments/finetune.py --config configs/lenet5_fashion_mnist.py --workdir runs/lenet5_fashion_mnist
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import lenet5_mnist  # noqa: E402  (configs are plain files, not a package)


def get_config(arg=None):
  return lenet5_mnist.get_config(arg, dataset="fashion_mnist")
