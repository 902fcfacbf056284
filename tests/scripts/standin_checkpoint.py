"""A stand-in float checkpoint for an ImageNet model config whose weights are not available here (MnasNet 1.0 / 1.3),
so that the config can be run end to end as a user with the real file would run it.

    python tests/scripts/standin_checkpoint.py configs/mnasnet_1.0.py /tmp/mnasnet_1.0_224.tflite
    python experiments/finetune.py --config configs/mnasnet_1.0_fat.py:quick --workdir runs/mnasnet_standin \
        --config.model.checkpoint=/tmp/mnasnet_1.0_224.tflite

The file is the config's architecture as a float TFLite model (batch norm folded into conv + bias, as in the hosted
files) with random weights: He-normal kernels, then, layer after layer in call order, each output channel's
pre-activation on a few unlabeled images scaled to standard deviation 1 and shifted to a mean drawn from N(1, 0.2)
(what a folded batch norm gives on the images it saw); linear outputs (a block's projection) centred; the logits
centred per class, standard deviation 2. Its predictions are not ImageNet classes (top-1 on the validation images is
chance), and a random network is more sensitive to quantization than a trained one (8-bit PTQ agrees with float on
far fewer images): the file tests that a config loads, calibrates, fine-tunes, evaluates and exports such a model, not
what accuracy it keeps. (With shifts drawn from N(0, 0.5) instead, W8A8 PTQ agreed with float on 8 % of 100 images,
against 74 % with these; MnasNet 1.0 at 96 px.)
"""

from __future__ import annotations

import argparse
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from fatq import cli, export  # noqa: E402
from fatq.data import imagenet  # noqa: E402
from fatq.layers import QConv, QDense, conv2d  # noqa: E402
from fatq.models import loaders, registry  # noqa: E402


class _Reached(Exception):
  def __init__(self, x):
    self.x = x


def _inputs_of(model, params, images, path: str) -> jax.Array:
  """The input of the layer at ``path`` (``block3/expand``) on ``images`` (the forward pass stops there)."""

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and "/".join(context.module.path) == path:
      raise _Reached(args[0])
    return next_fun(*args, **kwargs)

  try:
    with flax.linen.intercept_methods(interceptor):
      model.apply({"params": params}, images)
  except _Reached as reached:
    return reached.x
  raise ValueError(f"the model has no layer {path!r}")


def _pre_activation(layer, kernel, x) -> jax.Array:
  """The layer's output before bias and activation: its own convolution (or matrix product)."""
  if isinstance(layer, QDense):
    return x @ kernel
  return conv2d(x, kernel, layer.strides, layer.padding, layer.groups)


def standin_params(model, images: np.ndarray, seed: int = 0, image_size: int = 224, shift_mean: float = 1.0,
                   shift_std: float = 0.2) -> dict:
  """Random float params for ``model`` with batch-norm-like statistics on ``images`` (see the module docstring)."""
  rng = np.random.default_rng(seed)
  params = flax.core.unfreeze(model.init(jax.random.PRNGKey(seed), images[:1])["params"])
  modules = {}

  def record(next_fun, args, kwargs, context):  # the layer modules by path, for their strides and groups
    if isinstance(context.module, (QConv, QDense)):
      modules["/".join(context.module.path)] = context.module
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(record):
    model.apply({"params": params}, images[:1])
  for path, _ in loaders.ordered_layers(model, image_size):
    node = params
    for key in path.split("/"):
      node = node[key]
    layer, kernel = modules[path], np.asarray(node["kernel"])
    fan_in = int(np.prod(kernel.shape[:-1]))
    kernel = rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape).astype(np.float32)
    z = np.asarray(_pre_activation(layer, kernel, _inputs_of(model, params, images, path)))
    axes = tuple(range(z.ndim - 1))
    mean, std = z.mean(axis=axes), z.std(axis=axes) + 1e-6
    logits = isinstance(layer, QDense)
    target_std = 2.0 if logits else 1.0
    linear = logits or layer.activation == "none"
    shift = np.zeros_like(mean) if linear else rng.normal(shift_mean, shift_std, mean.shape)
    node["kernel"] = jnp.asarray(kernel * (target_std / std), jnp.float32)
    node["bias"] = jnp.asarray(shift - mean * (target_std / std), jnp.float32)
  return params


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="a model config file, e.g. configs/mnasnet_1.0.py")
  parser.add_argument("out", help="the .tflite file to write")
  parser.add_argument("--images", type=int, default=16, help="unlabeled images that set the statistics")
  parser.add_argument("--image_size", type=int, default=0, help="default: the config's")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--unlabeled_dir", default="", help="default: <data_root>/imagenet/unlabeled")
  parser.add_argument("--cache_dir", default="", help="the decoded-image cache (default: fatq's)")
  args = parser.parse_args(argv)
  cfg = cli.load_config(args.config)
  size = args.image_size or int(cfg.model.image_size)
  model = registry.build(cfg.model)
  images = imagenet.unlabeled_set(cfg.data.preprocessing, size, limit=args.images, cache_dir=args.cache_dir or None,
                                  folder=args.unlabeled_dir or None).images
  params = standin_params(model, images, args.seed, size)
  blob = export.convert_float(export.float_function(model, params, images[:1]))
  with open(args.out, "wb") as f:
    f.write(blob)
  print(f"wrote {args.out}: {cfg.model.name} {cfg.model.width} at {size} px, random weights with batch-norm-like "
        f"statistics on {len(images)} unlabeled images ({len(blob) / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
