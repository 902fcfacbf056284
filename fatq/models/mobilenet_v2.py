"""MobileNet v2 (Sandler et al., 2018) with folded batch norm and ReLU6.

Layers: ``conv1`` (3x3/2, 32*w) -> ``block0`` (depthwise + project, no expansion) -> ``block1..block16`` (``expand``
1x1, ``depthwise`` 3x3, linear ``project``, ``add`` when stride 1 and equal channels) -> ``head`` (1x1, 1280) ->
global average pool -> ``logits``. Channel rounding as keras.applications / TF-slim (multiples of 8, the head stays
1280 unless width > 1). Keras weights: 1000 classes; TF-slim / TFLite: 1001. All paddings are SAME (Keras'
``correct_pad`` equals SAME for 3x3 kernels).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fatq.config import QuantConfig
from fatq.layers import QConv, quant_point
from fatq.models.common import InvertedResidual, check_image, classify, make_divisible

# (expansion t, output channels c, repeats n, first stride s), the paper's Table 2.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
  width: float = 1.0
  num_classes: int = 1001
  stages: tuple = STAGES
  head_features: int = 1280
  quant: QuantConfig | None = None
  impl: str = "lax"
  quantize_pool: bool = False  # opt-in quantizer on the pooled features (see common.classify)
  # False: ReLU instead of ReLU6 everywhere, the form of cross-layer equalization that TFLite can export
  # (equalize='relu' in fatq.experiment; equalize=True keeps ReLU6 with per-channel bounds instead).
  relu6_clip: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_image("MobileNetV2", x)
    q, impl = self.quant, self.impl
    act = "relu6" if self.relu6_clip else "relu"
    x = quant_point(self, q, "input", x)
    x = QConv(make_divisible(32 * self.width), (3, 3), (2, 2), activation=act, quant=q, impl=impl,
              name="conv1")(x)
    i = 0
    for t, c, n, s in self.stages:
      out = make_divisible(int(c * self.width))
      for r in range(n):
        x = InvertedResidual(out, t, 3, s if r == 0 else 1, act, quant=q, impl=impl, name=f"block{i}")(x)
        i += 1
    head = make_divisible(self.head_features * self.width) if self.width > 1.0 else self.head_features
    x = QConv(head, (1, 1), activation=act, quant=q, impl=impl, name="head")(x)
    return classify(self, x, self.num_classes, q, self.quantize_pool)


def tiny(**kwargs) -> MobileNetV2:
  """Test-only configuration: width 0.35, three stages (5 blocks, two with residual adds), head 64 (32x32 images)."""
  return MobileNetV2(**{"width": 0.35, "stages": ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2)),
                        "head_features": 64, "num_classes": 10, **kwargs})
