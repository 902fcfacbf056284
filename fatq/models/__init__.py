"""Model definitions (Flax linen modules built from fatq layers) and their loaders."""

from fatq.models.lenet import LeNet5
from fatq.models.mnasnet import MnasNet
from fatq.models.mobilenet_v1 import MobileNetV1
from fatq.models.mobilenet_v2 import MobileNetV2
from fatq.models.registry import build, load

__all__ = ["LeNet5", "MnasNet", "MobileNetV1", "MobileNetV2", "build", "load"]
