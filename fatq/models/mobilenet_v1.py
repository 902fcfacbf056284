"""MobileNet v1 (Howard et al., 2017) with folded batch norm and ReLU6, in two padding flavours.

Layers: ``conv1`` (3x3/2, 32*w) -> ``block1..block13`` each ``depthwise`` (3x3) + ``pointwise`` (1x1) -> global
average pool -> ``logits``. ``keras_padding=True`` reproduces keras.applications.MobileNet since Keras 2.2, which pads
stride-2 convolutions by (0, 1) and uses VALID (equal to SAME on even sizes such as 224); TF-slim / TFLite, and
Keras 2.1 (the tfjs checkpoint in ../shared/data), use SAME.
Keras weights have 1000 classes, TF-slim / TFLite ones 1001 (class 0 = background).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fatq.config import QuantConfig
from fatq.layers import QConv, quant_point
from fatq.models.common import check_image, classify

# (pointwise filters, depthwise stride) of blocks 1..13 at width 1.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))


def depth(filters: int, width: float, min_depth: int = 8) -> int:
  return max(int(filters * width), min_depth)


class MobileNetV1(nn.Module):
  width: float = 1.0
  num_classes: int = 1000
  keras_padding: bool = False
  stem: int = 32
  blocks: tuple = BLOCKS
  quant: QuantConfig | None = None
  impl: str = "lax"
  quantize_pool: bool = False  # opt-in quantizer on the pooled features (see common.classify)
  # False: ReLU instead of ReLU6 everywhere, the form of cross-layer equalization that TFLite can export
  # (equalize='relu' in fatq.experiment; equalize=True keeps ReLU6 with per-channel bounds instead).
  relu6_clip: bool = True

  def _pad(self, stride: int):
    return ((0, 1), (0, 1)) if self.keras_padding and stride == 2 else "SAME"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_image("MobileNetV1", x)
    q, impl = self.quant, self.impl
    act = "relu6" if self.relu6_clip else "relu"
    x = quant_point(self, q, "input", x)
    x = QConv(depth(self.stem, self.width), (3, 3), (2, 2), self._pad(2), activation=act, quant=q, impl=impl,
              name="conv1")(x)
    for i, (filters, stride) in enumerate(self.blocks, 1):
      x = SeparableBlock(depth(filters, self.width), stride, self._pad(stride), quant=q, impl=impl, activation=act,
                         name=f"block{i}")(x)
    return classify(self, x, self.num_classes, q, self.quantize_pool)


class SeparableBlock(nn.Module):
  features: int
  stride: int = 1
  padding: object = "SAME"
  quant: QuantConfig | None = None
  impl: str = "lax"
  activation: str = "relu6"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = QConv(c, (3, 3), (self.stride, self.stride), self.padding, groups=c, activation=self.activation,
              quant=self.quant, impl=self.impl, name="depthwise")(x)
    return QConv(self.features, (1, 1), activation=self.activation, quant=self.quant, impl=self.impl,
                 name="pointwise")(x)


def tiny(**kwargs) -> MobileNetV1:
  """Test-only configuration: width 0.25, three blocks (use 32x32 images)."""
  return MobileNetV1(**{"width": 0.25, "blocks": BLOCKS[:3], "num_classes": 10, **kwargs})
