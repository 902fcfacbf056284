"""Architectures: published parameter / multiply-add counts, shapes, quantization point names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fatq import models
from fatq.config import QuantConfig, QuantSpec
from fatq.models import common, mnasnet, mobilenet_v1, mobilenet_v2


def _shapes(m, size=224):
  return jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"]


# Published: Keras MobileNet (trainable) 4,231,976 and 569M MACs; MobileNet v2 3,504,872 (Keras trainable /
# torchvision) and 300M MACs (paper); MnasNet-B1 1.0 / 1.3 (torchvision mnasnet1_0 / 1_3): 4,383,312 / 6,282,256
# parameters, 0.314 / 0.526 GMACs. All with 1000 classes and batch norm counted as gamma + beta.
@pytest.mark.parametrize("model,params,macs", [
    (mobilenet_v1.MobileNetV1(1.0, 1000), 4_231_976, 569e6),
    (mobilenet_v2.MobileNetV2(1.0, 1000), 3_504_872, 300e6),
    (mnasnet.MnasNet(1.0, 1000), 4_383_312, 314e6),
    (mnasnet.MnasNet(1.3, 1000), 6_282_256, 526e6),
])
def test_published_counts(model, params, macs):
  p = _shapes(model)
  assert common.count_params(p) == params
  assert abs(common.count_macs(model, p) - macs) / macs < 0.005


def test_mnasnet_block_list():
  p = _shapes(mnasnet.MnasNet(1.0, 1001))
  blocks = [k for k in p if k.startswith("block")]
  assert len(blocks) == 17
  assert p["conv1"]["kernel"].shape == (3, 3, 3, 32)
  assert "expand" not in p["block0"] and p["block0"]["project"]["kernel"].shape == (1, 1, 32, 16)
  assert p["block4"]["depthwise"]["kernel"].shape == (5, 5, 1, 72)  # r3_k5_s22_e3_i24_o40, first repeat
  assert p["block16"]["project"]["kernel"].shape == (1, 1, 1152, 320)
  assert p["head"]["kernel"].shape == (1, 1, 320, 1280) and p["logits"]["kernel"].shape == (1280, 1001)
  p13 = _shapes(mnasnet.MnasNet(1.3, 1001))
  assert p13["conv1"]["kernel"].shape == (3, 3, 3, 40) and p13["head"]["kernel"].shape[-1] == 1280


@pytest.mark.parametrize("mod", [mobilenet_v1, mobilenet_v2, mnasnet])
def test_tiny_quant_points(mod):
  model = mod.tiny()
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  y = jax.jit(model.apply)({"params": params}, x)
  assert y.shape == (2, 10)
  q = QuantConfig.uniform(QuantSpec(8), QuantSpec(8))
  qm = model.clone(quant=q)
  _, state = jax.jit(lambda v, x: qm.apply(v, x, mutable=["quant_stats"]))({"params": params}, x)
  flat = jax.tree_util.tree_flatten_with_path(state["quant_stats"])[0]
  names = {"/".join(k.key for k in path[:-1]) for path, _ in flat}
  assert "input_quant" in names and "logits/output_quant" in names and "conv1/kernel_quant" in names
  if mod is not mobilenet_v1:
    assert any(n.endswith("/add_quant") for n in names)
    assert "block1/expand/output_quant" in names
  yq = jax.jit(qm.apply)({"params": params, "quant_stats": state["quant_stats"]}, x)
  assert np.max(np.abs(np.asarray(yq) - np.asarray(y))) < 0.1 * np.max(np.abs(np.asarray(y))) + 1e-3
  assert not any("pool" in n for n in names)


def test_activations_as_originals():
  p = mobilenet_v2.tiny()
  x = jnp.full((1, 32, 32, 3), 50.0)  # large input: ReLU6 saturates, ReLU does not

  def first_output(model):
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
    params = jax.tree_util.tree_map(jnp.abs, params)
    _, st = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))(
        {"params": params}, x)
    return float(jnp.max(st["intermediates"]["conv1"]["__call__"][0]))

  assert first_output(p) == 6.0
  assert first_output(mnasnet.tiny()) > 6.0
  assert first_output(mobilenet_v1.tiny()) == 6.0


def test_build_from_config():
  m = models.build(dict(name="mnasnet", width=1.3, num_classes=1001))
  assert isinstance(m, models.MnasNet) and m.width == 1.3
  with pytest.raises(ValueError, match="unknown model"):
    models.build(dict(name="resnet"))
  with pytest.raises(FileNotFoundError, match="checkpoint is empty: mnasnet needs .*; mnasnet_1.0_224.tflite"):
    models.load(dict(name="mnasnet", width=1.0, num_classes=1001, checkpoint="",
                     checkpoint_hint="mnasnet_1.0_224.tflite"))
  with pytest.raises(FileNotFoundError, match=r"checkpoint /no/such \(config.model.checkpoint\) does not exist; "
                                              "pass --config.model.checkpoint="):
    models.load(dict(name="mobilenet_v2", width=1.0, num_classes=1001, checkpoint="/no/such"))
