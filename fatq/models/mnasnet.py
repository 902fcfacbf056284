"""MnasNet (Tan et al., "MnasNet: Platform-Aware Neural Architecture Search for Mobile", arXiv 1807.11626) as the
TFLite-hosted ``mnasnet_1.0_224`` / ``mnasnet_1.3_224`` (09_07_2018) models that the FAT paper quantizes.

Source of the block list: tensorflow/tpu ``models/official/mnasnet/mnasnet_models.py``, model ``mnasnet-b1`` (the
search result without squeeze-and-excitation; ``mnasnet-a1`` adds SE blocks and has 3.9M parameters, which does not
fit the hosted files' 17 MB / 24 MB of float32 weights; B1 at 1.0 is 4.38M parameters = 17.5 MB):

    r1_k3_s11_e1_i32_o16_noskip, r3_k3_s22_e3_i16_o24, r3_k5_s22_e3_i24_o40, r3_k5_s22_e6_i40_o80,
    r2_k3_s11_e6_i80_o96, r4_k5_s22_e6_i96_o192, r1_k3_s11_e6_i192_o320_noskip

(r repeats, k depthwise kernel, s stride of the first repeat, e expansion, i/o channels). Stem: 3x3/2 conv, 32
channels, batch norm, **ReLU**; every block activation is ReLU (not ReLU6); the head is a 1x1 conv to 1280 channels
(not scaled by the width multiplier) + ReLU, global average pool, dense logits. Batch-norm eps 1e-3. Channels are
rounded by ``round_filters`` (multiple of 8, not more than 10% down). A block adds its input when stride 1 and
input channels == output channels (and not ``noskip``). Published figures (torchvision ``mnasnet1_0`` /
``mnasnet1_3``, the same B1 network, 1000 classes): 4,383,312 / 6,282,256 parameters, 0.314 / 0.526 GMACs.

Names: ``conv1``, ``block0..block16`` (``expand``, ``depthwise``, ``project``, ``add``), ``head``, ``logits``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fatq.config import QuantConfig
from fatq.layers import QConv, quant_point
from fatq.models.common import InvertedResidual, check_image, classify, make_divisible

# (repeats, kernel, first stride, expansion, output channels, skip allowed): mnasnet-b1.
BLOCKS_B1 = ((1, 3, 1, 1, 16, False), (3, 3, 2, 3, 24, True), (3, 5, 2, 3, 40, True), (3, 5, 2, 6, 80, True),
             (2, 3, 1, 6, 96, True), (4, 5, 2, 6, 192, True), (1, 3, 1, 6, 320, False))


class MnasNet(nn.Module):
  width: float = 1.0
  num_classes: int = 1001
  blocks: tuple = BLOCKS_B1
  stem: int = 32
  head_features: int = 1280
  quant: QuantConfig | None = None
  impl: str = "lax"
  quantize_pool: bool = False  # opt-in quantizer on the pooled features (see common.classify)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_image("MnasNet", x)
    q, impl = self.quant, self.impl
    x = quant_point(self, q, "input", x)
    x = QConv(make_divisible(self.stem * self.width), (3, 3), (2, 2), activation="relu", quant=q, impl=impl,
              name="conv1")(x)
    i = 0
    for repeats, k, s, e, out, skip in self.blocks:
      out = make_divisible(out * self.width)
      for r in range(repeats):
        x = InvertedResidual(out, e, k, s if r == 0 else 1, "relu", residual=skip, quant=q, impl=impl,
                             name=f"block{i}")(x)
        i += 1
    x = QConv(self.head_features, (1, 1), activation="relu", quant=q, impl=impl, name="head")(x)
    return classify(self, x, self.num_classes, q, self.quantize_pool)


def tiny(**kwargs) -> MnasNet:
  """Test-only configuration: width 0.5, five blocks (3x3 and 5x5 kernels, residual adds), head 64 (32x32 images)."""
  return MnasNet(**{"width": 0.5, "blocks": ((1, 3, 1, 1, 16, False), (2, 3, 2, 3, 24, True), (2, 5, 2, 6, 40, True)),
                    "head_features": 64, "num_classes": 10, **kwargs})
