"""LeNet-5 (LeCun et al., 1998) for 28x28 grayscale images, with ReLU and max pooling as in ptq-lenet5.txt.

conv1 5x5x6 (same) -> pool -> conv2 5x5x16 (valid) -> pool -> fc1 120 -> fc2 84 -> fc3 (logits).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fatq.config import QuantConfig
from fatq.layers import QConv, QDense, on_grid_of, quant_point


class LeNet5(nn.Module):
  num_classes: int = 10
  quant: QuantConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[1:] != (28, 28, 1):
      raise ValueError(f"LeNet5 expects images of shape (batch, 28, 28, 1), got {x.shape}")
    q = self.quant
    x = quant_point(self, q, "input", x)
    x = QConv(6, (5, 5), padding="SAME", activation="relu", quant=q, name="conv1")(x)
    x = on_grid_of(x, nn.max_pool(x, (2, 2), (2, 2)))  # max of grid values stays on the grid: no quantizer needed
    x = QConv(16, (5, 5), padding="VALID", activation="relu", quant=q, name="conv2")(x)
    x = on_grid_of(x, nn.max_pool(x, (2, 2), (2, 2)))
    x = on_grid_of(x, x.reshape(x.shape[0], -1))
    x = QDense(120, activation="relu", quant=q, name="fc1")(x)
    x = QDense(84, activation="relu", quant=q, name="fc2")(x)
    return QDense(self.num_classes, quant=q, name="fc3")(x)
