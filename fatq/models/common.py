"""Building blocks shared by the ImageNet models, and architecture accounting (parameter and multiply-add counts).

Batch norm is always folded (conv + bias); quantization points follow the TFLite graph: the input image, every
kernel and every conv output (after its activation), every residual add and the logits. The global average pool has
no quantizer (TFLite's pool keeps its input's scale).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fatq.config import QuantConfig
from fatq.layers import QConv, QDense, global_average_pool, requantized_mean, residual_add


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
  """TF's channel rounding (MobileNet v2 ``_make_divisible``, MnasNet ``round_filters``): nearest multiple of
  ``divisor``, at least ``min_value``, never more than 10% below ``v``."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class InvertedResidual(nn.Module):
  """MobileNet v2 / MnasNet block: [1x1 expand] -> kxk depthwise -> 1x1 linear project [-> + input].

  Children ``expand`` (absent when ``expansion == 1``), ``depthwise``, ``project``; the residual sum is the
  quantization point ``<block>/add``.
  """

  features: int
  expansion: int
  kernel: int = 3
  stride: int = 1
  activation: str = "relu6"
  residual: bool = True  # id_skip: add the input when shapes allow
  quant: QuantConfig | None = None
  impl: str = "lax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    q, cin = self.quant, x.shape[-1]
    y = x
    if self.expansion != 1:
      y = QConv(cin * self.expansion, (1, 1), activation=self.activation, quant=q, impl=self.impl, name="expand")(y)
    hidden = y.shape[-1]
    y = QConv(hidden, (self.kernel, self.kernel), (self.stride, self.stride), groups=hidden,
              activation=self.activation, quant=q, impl=self.impl, name="depthwise")(y)
    y = QConv(self.features, (1, 1), activation="none", quant=q, impl=self.impl, name="project")(y)
    if self.residual and self.stride == 1 and cin == self.features:
      y = residual_add(self, q, x, y)
    return y


def classify(module: nn.Module, x: jax.Array, num_classes: int, quant: QuantConfig | None,
             quantize_pool: bool = False) -> jax.Array:
  """Global average pool (no quantizer: TFLite's AVERAGE_POOL_2D keeps its input's scale) -> dense layer ``logits``.

  ``quantize_pool`` (opt-in, off by default) adds a quantization point ``pool`` for TFLite files whose MEAN operator
  requantizes to its own scale (TF2 post-training quantization), used to reproduce such files exactly.
  Call from a compact method: the dense layer becomes that module's child ``logits``."""
  x = requantized_mean(module, quant, x) if quantize_pool else global_average_pool(x)
  return QDense(num_classes, quant=quant, name="logits")(x)


def check_image(name: str, x: jax.Array) -> None:
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"{name} expects RGB images of shape (batch, height, width, 3), got {x.shape}")


# ---------------------------------------------------------------------------------------------------------------------
# Accounting.


def layers(params) -> list[tuple[str, dict]]:
  """``(path, {'kernel': ..., 'bias': ...})`` of every conv/dense layer, in creation (= execution) order."""
  out = []

  def walk(tree, prefix):
    if "kernel" in tree and not isinstance(tree["kernel"], dict):
      out.append(("/".join(prefix), tree))
      return
    for k, v in tree.items():
      if isinstance(v, dict) or hasattr(v, "items"):
        walk(v, prefix + (k,))

  walk(params, ())
  return out


def count_params(params, unfold_batch_norm: bool = True) -> int:
  """Parameter count. With ``unfold_batch_norm`` every folded conv bias counts as batch norm's gamma and beta (2 per
  channel), which is how the published figures (Keras trainable count, torchvision) count; the classifier keeps its
  real bias."""
  n = 0
  for path, layer in layers(params):
    n += int(np.prod(layer["kernel"].shape))
    if "bias" in layer:
      c = int(np.prod(layer["bias"].shape))
      n += 2 * c if unfold_batch_norm and layer["kernel"].ndim == 4 else c
  return n


def count_macs(model: nn.Module, params, image_size: int = 224) -> int:
  """Multiply-accumulates of one image: sum over conv/dense layers of output elements x (kernel elements per output)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  _, state = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, capture_intermediates=True), params, x)
  kernels = dict(layers(params))
  total = 0

  def walk(tree, prefix):
    nonlocal total
    for k, v in tree.items():
      if k == "__call__":
        path = "/".join(prefix)
        if path in kernels:
          kshape = kernels[path]["kernel"].shape
          out = v[0].shape
          per_out = int(np.prod(kshape[:-1]))  # kh*kw*cin_per_group or cin
          total += int(np.prod(out)) * per_out
      elif isinstance(v, dict) or hasattr(v, "items"):
        walk(v, prefix + (k,))

  walk(state["intermediates"], ())
  return total


def tiny_image_size() -> int:
  return 32

