"""``build(cfg)`` / ``load(cfg)``: from a ``config.model`` dict to a module and its float params.

``cfg`` keys: ``name`` ('mobilenet_v1', 'mobilenet_v2', 'mnasnet'), ``width``, ``num_classes`` (1000 Keras,
1001 TF-slim/TFLite), ``checkpoint`` (path), ``checkpoint_format`` ('keras_h5', 'tfjs', 'tflite' or '' to guess),
optional ``image_size`` (224), ``impl`` ('lax'), ``keras_padding`` (MobileNet v1 only; default: what the Keras
checkpoint's stored topology does, :func:`fatq.models.loaders.stored_keras_padding`, True for a Keras file without
one, False for TFLite).
"""

from __future__ import annotations

import os

from fatq.models import loaders

NAMES = ("mobilenet_v1", "mobilenet_v2", "mnasnet")


def _get(cfg, key, default=None):
  try:
    v = cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if v is None else v


def build(cfg, quant=None):
  from fatq.models.mnasnet import MnasNet
  from fatq.models.mobilenet_v1 import MobileNetV1
  from fatq.models.mobilenet_v2 import MobileNetV2

  name = _get(cfg, "name")
  common = dict(width=float(_get(cfg, "width", 1.0)), num_classes=int(_get(cfg, "num_classes", 1001)),
                quant=quant, impl=_get(cfg, "impl", "lax"))
  if name == "mobilenet_v1":
    return MobileNetV1(keras_padding=_keras_padding(cfg), **common)
  if name == "mobilenet_v2":
    return MobileNetV2(**common)
  if name == "mnasnet":
    return MnasNet(**common)
  raise ValueError(f"unknown model {name!r} in config.model.name; known: {NAMES}")


def _keras_padding(cfg) -> bool:
  """MobileNet v1's padding of stride-2 convolutions: as configured, else as the checkpoint's own model has it."""
  given = _get(cfg, "keras_padding")
  if given is not None:
    return bool(given)
  ckpt, fmt = _get(cfg, "checkpoint", ""), _get(cfg, "checkpoint_format", "") or ""
  if not fmt and ckpt:
    try:
      fmt = loaders.guess_format(ckpt)
    except loaders.CheckpointError:
      return False
  if fmt not in ("keras_h5", "tfjs"):
    return False
  stored = loaders.stored_keras_padding(ckpt, fmt) if ckpt else None
  return True if stored is None else stored


def load(cfg, quant=None):
  """``(module, params, LoadReport)``; raises FileNotFoundError naming the file needed when there is none."""
  model = build(cfg, quant)
  ckpt = _get(cfg, "checkpoint", "")
  fix = _get(cfg, "checkpoint_hint", "") or "pass --config.model.checkpoint=/path/to/the/file"
  if not ckpt:
    raise FileNotFoundError(f"config.model.checkpoint is empty: {cfg['name']} needs a pre-trained checkpoint; {fix}")
  if not os.path.exists(ckpt):
    raise FileNotFoundError(f"checkpoint {ckpt} (config.model.checkpoint) does not exist; {fix}")
  params, report = loaders.load_checkpoint(model, ckpt, _get(cfg, "checkpoint_format", "") or None,
                                           int(_get(cfg, "image_size", 224)))
  return model, params, report
