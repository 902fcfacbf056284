"""From an experiment config to ``(model, float params, Data)``: the model family decides where weights and images
come from. Small models (LeNet-5) are trained here once and cached; ImageNet models load a user's checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Callable

import numpy as np

from fatq.experiment import (Data, atomic_write_json, changed_values, check_config, check_labels, load_variables,
                             save_variables)

Tree = Any


def prepare(cfg, workdir: str, progress: bool = True) -> tuple[Any, Tree, Data]:
  check_config(cfg)  # before minutes of data loading or float training
  if cfg.model.name == "lenet5":
    return _lenet5(cfg, workdir, progress)
  return _imagenet(cfg, progress)


def check_params_fit(model, params: Tree, sample: np.ndarray, source: str, fix: str) -> None:
  """Raise if ``params`` (from ``source``) do not have the structure and shapes ``model`` needs: a checkpoint of
  another architecture, width or class count fails here with the first difference, not deep inside a forward pass."""
  import flax
  import jax

  want = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), sample)["params"]
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(want), sep="/")
  got = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  what = f"the checkpoint {source} does not fit {type(model).__name__}"
  for name in sorted(want):
    if name not in got:
      raise ValueError(f"{what}: it has no {name}; {fix}")
    if tuple(np.shape(got[name])) != tuple(want[name].shape):
      raise ValueError(f"{what}: {name} has shape {tuple(np.shape(got[name]))}, the model needs "
                       f"{tuple(want[name].shape)} (another architecture, width or number of classes?); {fix}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"{what}: it has tensors the model lacks, e.g. {extra[0]}; {fix}")


def split_unlabeled(images: np.ndarray, cfg_data, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Disjoint ``(train, calibration, holdout)`` subsets of an unlabeled pool, by a seeded permutation."""
  n_train, n_cal, n_hold = cfg_data.num_train, cfg_data.num_calibration, cfg_data.num_holdout
  if n_cal < 1:
    raise ValueError(f"data.num_calibration must be >= 1, got {n_cal}")
  order = np.random.default_rng(seed).permutation(len(images))
  need = n_cal + n_hold + 1
  if len(images) < need:
    raise ValueError(f"only {len(images)} unlabeled images: calibration ({n_cal}) and held-out ({n_hold}) sets "
                     "need more; lower data.num_calibration / data.num_holdout or add images")
  cal = images[order[:n_cal]]
  hold = images[order[n_cal:n_cal + n_hold]]
  rest = order[n_cal + n_hold:]
  train = images[rest[:n_train] if n_train else rest]
  return train, cal, hold


def _lenet5(cfg, workdir: str, progress: bool):
  from fatq.data import idx
  from fatq.models import LeNet5
  from fatq.training import train_classifier

  m = cfg.model
  train_x, train_y = idx.load(cfg.data.name, "train", cfg.data.dir or None)
  test_x, test_y = idx.load(cfg.data.name, "test", cfg.data.dir or None)
  for labels in (train_y, test_y):  # before the float model trains on them
    check_labels(labels, 0, int(m.num_classes))
  model = LeNet5(num_classes=m.num_classes)
  ckpt = m.checkpoint or os.path.join(workdir, "float_checkpoint")

  def train():
    print(f"float LeNet-5: training {m.float_epochs} epochs on {len(train_x)} labeled {cfg.data.name} images "
          f"(cached in {ckpt})")
    return train_classifier(model, train_x, train_y, epochs=m.float_epochs, batch_size=m.float_batch_size,
                            lr=m.float_lr, weight_decay=m.get("float_weight_decay", 0.0), seed=cfg.seed,
                            progress=progress)

  if m.checkpoint:  # a user's model: used as it is
    if not os.path.isdir(ckpt):
      raise FileNotFoundError(f"config.model.checkpoint {m.checkpoint!r} does not exist; leave it empty to train "
                              "the float model here")
    params, loaded = load_variables(ckpt)["params"], True
  else:
    params, loaded = cached_float_params(ckpt, float_training(cfg), train, print, "float LeNet-5")
  if loaded:
    fix = (f"point config.model.checkpoint at a LeNet-5 with {m.num_classes} classes, or leave it empty to train "
           "one here" if m.checkpoint else "delete it to train the float model here again")
    check_params_fit(model, params, train_x[:1], ckpt, fix)
    print(f"float LeNet-5: loaded {ckpt}")
  train, cal, hold = split_unlabeled(train_x, cfg.data, cfg.seed)  # labels of these are never used
  return model, params, Data(train=train, calibration=cal, holdout=hold, eval_images=test_x, eval_labels=test_y,
                             sources=idx.sources(cfg.data.name, cfg.data.dir or None))


def float_training(cfg) -> dict:
  """What a float LeNet-5 trained in a workdir depends on, stored beside it (``float_checkpoint.json``)."""
  m = cfg.model
  return dict(data=cfg.data.name, data_dir=cfg.data.dir, num_classes=m.num_classes, epochs=m.float_epochs,
              batch_size=m.float_batch_size, lr=m.float_lr, weight_decay=m.get("float_weight_decay", 0.0),
              seed=cfg.seed)


def cached_float_params(ckpt: str, settings: dict, train: Callable[[], Tree], log: Callable[[str], None],
                        what: str) -> tuple[Tree, bool]:
  """``(params, loaded)``: the float model cached at ``ckpt`` when it was trained with ``settings`` (stored beside it,
  ``ckpt.json``), else ``train()``'s, cached there with its settings (``loaded`` False)."""
  changed = _float_training_changes(ckpt, settings)
  if changed:
    log(f"{what}: {ckpt} was trained with other settings ({changed}); training it again")
  if os.path.isdir(ckpt) and not changed:
    return load_variables(ckpt)["params"], True
  params = train()
  with contextlib.suppress(FileNotFoundError):
    os.remove(ckpt + ".json")  # no settings that the checkpoint may not have, should saving it fail
  save_variables(ckpt, {"params": params})
  atomic_write_json(ckpt + ".json", settings)
  return params, False


def _float_training_changes(ckpt: str, wanted: dict) -> str:
  """``'epochs 8 -> 15, ...'`` where the float model cached at ``ckpt`` was trained otherwise than ``wanted``; ''
  where it was not, or where no settings were stored with it (a workdir of an older fatq: reused as before)."""
  try:
    with open(ckpt + ".json") as f:
      stored = json.load(f)
  except FileNotFoundError:
    return ""
  return ", ".join(changed_values(stored, wanted))


def _imagenet(cfg, progress: bool):
  from fatq import models
  from fatq.data import imagenet

  model, params, report = models.load(cfg.model)  # names the missing checkpoint file if there is none
  print(report.summary())
  d = cfg.data
  offset = 1 if int(cfg.model.num_classes) == 1001 else 0  # 1001-class models: class 0 is "background"
  val = imagenet.evaluation_set(d, label_offset=offset, limit=d.val_limit or None, progress=progress)
  check_labels(val.labels - offset, offset, int(cfg.model.num_classes))  # the label file's numbering, not 0 % top-1
  pool = imagenet.unlabeled_pool(d, progress)
  for name, s in (("validation", val), ("unlabeled", pool)):
    if s.skipped:
      print(f"{name}: skipped {len(s.skipped)} unreadable image(s), e.g. {s.skipped[0]}")
  shared = imagenet.shared_images(val, pool)
  if shared:
    warnings.warn(f"{len(shared)} of the {len(val.files)} validation images are also in the unlabeled pool (e.g. "
                  f"{shared[0]}): the scores are then measured on images that calibration and fine-tuning saw. Keep "
                  "the two sets apart (data.val_dir / data.unlabeled_dir, or the tfds splits)")
  train, cal, hold = split_unlabeled(pool.images, d, cfg.seed)
  print(f"images: {len(train)} train, {len(cal)} calibration, {len(hold)} held-out (unlabeled); "
        f"{len(val.images)} labeled validation")
  return model, params, Data(train=train, calibration=cal, holdout=hold, eval_images=val.images,
                             eval_labels=val.labels, sources=imagenet.sources(d))
