"""Model definitions (Flax linen modules built from fatq layers) and their loaders."""

from fatq.models.lenet import LeNet5

__all__ = ["LeNet5"]
