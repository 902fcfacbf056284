"""The quantization experiment behind ``experiments/finetune.py``: float baseline, post-training quantization and
FAT fine-tuning for each configured quantization setting, evaluated, tabulated and written to ``results.json``.

A run is resumable at row granularity: ``results.json`` is rewritten (atomically) after every row, and a resumed run
skips the rows already there. It must have the same config (:func:`check_resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
from typing import Any, Callable

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fatq import calibration, equalize, layers, parallel, plots, training
from fatq.config import QuantConfig, QuantRule, QuantSpec
from fatq.fileio import write_atomically
from fatq.layers import STATS, THRESHOLDS

Tree = Any


@dataclasses.dataclass
class Data:
  """Arrays an experiment needs. ``train`` is unlabeled (FAT never sees labels); labels are for evaluation only."""

  train: np.ndarray
  calibration: np.ndarray
  holdout: np.ndarray
  eval_images: np.ndarray
  eval_labels: np.ndarray
  label_offset: int = 0  # 1 for 1001-class models whose class 0 is "background"
  sources: dict[str, str] = dataclasses.field(default_factory=dict)  # where each set was read, for results.json


def atomic_write_json(path: str, obj) -> None:
  """``obj`` as JSON, written whole (:func:`fatq.fileio.write_atomically`): a crash or a full disk while writing
  leaves the previous file intact."""
  write_atomically(path, lambda f: json.dump(obj, f, indent=2, default=_json_default))


def _is_disk_full(e: BaseException) -> bool:
  # orbax / tensorstore report a full disk in their own exception types, with the OS message in the text
  return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


@contextlib.contextmanager
def _saving(what: str, workdir: str):
  """Turn a full disk while writing ``what`` into an error that says so and how to continue."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - re-raised unchanged unless it is a full disk
    if not _is_disk_full(e):
      raise
    raise OSError(errno.ENOSPC, f"disk full while writing {what}: free space on the disk of {workdir}, then run "
                  "the same command with --resume to continue; the rows already in results.json and the "
                  "fine-tuning checkpoints are kept") from e


class InputError(ValueError):
  """Bad input found before the work it would spoil (a config value, non-finite weights or images, a rule that
  matches nothing): entry points print it as one line."""


def is_int_at_least(value, least: int) -> bool:
  """An integer (not a bool) >= ``least``: a config's count or size."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Reject values that would fail (or silently do nothing) only after minutes of data loading or training, with
  the config key and the fix in the message. Raises :class:`InputError`."""
  try:
    _check_config(cfg)
  except InputError:
    raise
  except ValueError as e:
    raise InputError(str(e)) from None


def _check_config(cfg: ml_collections.ConfigDict) -> None:
  def need(ok: bool, key: str, value, want: str):
    if not ok:
      raise ValueError(f"config.{key} = {value!r}: {want} (set it with --config.{key}=...)")

  def value_of(key: str):
    section, _, leaf = key.rpartition(".")
    node = cfg.get(section) if section else cfg
    return node.get(leaf) if node is not None and hasattr(node, "get") else None

  for key in ("calibration.batch_size", "eval_batch_size", "data.image_size", "model.image_size"):
    value = value_of(key)
    if value is not None:
      need(is_int_at_least(value, 1), key, value, "must be a positive integer")
  # sizes are slice bounds: a negative one would quietly drop images from the other end
  for key, least, want in (("seed", 0, "must be an integer >= 0"),
                           ("data.num_train", 0, "must be an integer >= 0 (0: every image left)"),
                           ("data.num_calibration", 1, "must be a positive integer"),
                           ("data.val_limit", 0, "must be an integer >= 0 (0: every image)")):
    value = value_of(key)
    if value is not None:
      need(is_int_at_least(value, least), key, value, want)
  model = cfg.get("model", None)
  if model is not None and model.get("name", "") == "lenet5" and not model.get("checkpoint", ""):
    # the float LeNet-5 is trained here first: a bad setting would train (and cache) a useless teacher
    for key, ok, want in (("float_epochs", is_int_at_least(model.get("float_epochs"), 1), "must be a positive integer"),
                          ("float_batch_size", is_int_at_least(model.get("float_batch_size"), 1),
                           "must be a positive integer"),
                          ("float_lr", isinstance(model.get("float_lr"), (int, float)) and model.get("float_lr") > 0,
                           "must be a positive learning rate")):
      need(ok, f"model.{key}", model.get(key), want)
  rows = cfg.get("rows", None) or []
  try:
    base = base_rules(cfg)
  except ValueError as e:
    raise ValueError(f"config.input_bits = {cfg.get('input_bits')!r}: {e}") from None
  for i, row in enumerate(rows):
    try:
      quant_config(row, base)
      if row.get("equalize", False) not in EQUALIZE_MODES:
        raise ValueError(f"equalize must be one of {EQUALIZE_MODES}, got {row.get('equalize')!r}")
      if row.get("bias_correction", False) not in BIAS_CORRECTION_MODES:
        raise ValueError(f"bias_correction must be one of {BIAS_CORRECTION_MODES}, got "
                         f"{row.get('bias_correction')!r}")
      if row.get("learn_biases", False) and not row.get("fat", False):
        raise ValueError("learn_biases: the bias offsets are learned by FAT fine-tuning; set fat=True on this row")
      if row.get("bias_correction", row.get("equalize", False)) and not row.get("weight_bits", 8):
        raise ValueError("bias_correction corrects the error of quantized weights: it needs weight_bits")
      if row.get("fat", False) and not _may_train(row):
        raise ValueError("fat=True with trainable=False: the row has nothing to fine-tune (its PTQ row is the same "
                         "model); drop fat, or set trainable=True")
    except (ValueError, TypeError) as e:
      raise ValueError(f"config.rows[{i}] ({row_name(row)}): {e}") from None
  first = {}
  for i, row in enumerate(rows):  # a row's name is its folder, its checkpoints and its key for --resume
    j = first.setdefault(row_name(row), i)
    if j != i:
      raise ValueError(f"config.rows[{j}] and config.rows[{i}] are both named {row_name(row)!r} (the name says bits, "
                       "granularity, symmetry and calibration, not every setting): give one of them name='...'")
  if not any(row.get("fat", False) for row in rows):
    return
  fat = cfg.get("fat", None)
  need(fat is not None, "fat", None, "rows with fat=True need a fat section (epochs, batch_size, lr, ...)")
  problems = fat_problems(fat)
  if problems:  # every one at once: a user with two typos fixes both in one go
    raise ValueError("; ".join(f"config.fat.{key} = {value!r}: {want} (set it with --config.fat.{key}=...)"
                               for key, value, want in problems))
  for i, row in enumerate(rows):  # rows with their own fine-tuning settings (fat=dict(...))
    if isinstance(row.get("fat", False), bool):  # True / False: config.fat itself, checked above
      continue
    try:
      problems = fat_problems(row_fat_config(cfg, row))
    except (ValueError, TypeError, KeyError) as e:
      problems = [(None, None, e.args[0] if e.args else str(e))]
    if problems:
      raise ValueError(f"config.rows[{i}] ({row_name(row)}): "
                       + "; ".join((f"fat.{key} = {value!r}: " if key else "") + want for key, value, want in problems))
  data = cfg.get("data", None)
  num_train = data.get("num_train", 0) if data is not None else 0
  if num_train:  # 0: every image left, known only once the data is read
    for i, fat in enumerate([cfg.fat] + [row_fat_config(cfg, r) for r in rows if fat_overrides(r)]):
      batch = parallel.global_batch_size(fat, jax.device_count())
      need(num_train >= batch, "data.num_train", num_train, f"fewer than one training batch of {batch} "
           f"({'config.fat' if i == 0 else 'a row'}'s batch_size): lower the batch or train on more images")
  if data is not None and data.get("tfds_name", ""):
    for key in ("val_dir", "unlabeled_dir"):
      need(not data.get(key, ""), f"data.{key}", data.get(key), f"images come from tfds {data.tfds_name!r} "
           "(data.tfds_name) or from folders, not both: empty one of the two")
  if data is not None and data.get("num_holdout", None) is not None:
    need(isinstance(data.num_holdout, int) and data.num_holdout >= 1, "data.num_holdout", data.num_holdout,
         "fine-tuning needs held-out images to pick the best thresholds: at least 1")


def fat_problems(fat) -> list[tuple[str, Any, str]]:
  """``(key, value, what it must be)`` for each value of a fat section that would fail only after minutes of work."""
  problems = []
  for key in ("epochs", "batch_size", "restart_period"):
    if not (isinstance(fat.get(key), int) and fat.get(key) >= 1):
      problems.append((key, fat.get(key), "must be a positive integer"))
  for key in ("eval_every", "checkpoint_every"):
    value = fat.get(key, 0)
    if not (isinstance(value, int) and value >= 0):
      problems.append((key, value, "must be an integer >= 0 (0: default)"))
  lr, lr_min = fat.get("lr"), fat.get("lr_min", 0.0)
  if not (isinstance(lr, (int, float)) and lr > 0):
    problems.append(("lr", lr, "must be a positive learning rate"))
  elif not (isinstance(lr_min, (int, float)) and 0 <= lr_min <= lr):
    problems.append(("lr_min", lr_min, f"the schedule's lowest learning rate: must be in [0, lr = {lr}]"))
  if not isinstance(fat.get("project_factors", False), bool):
    problems.append(("project_factors", fat.get("project_factors"), "must be True or False"))
  if not is_int_at_least(fat.get("seed", 0), 0):
    problems.append(("seed", fat.get("seed"), "must be an integer >= 0"))
  per_device = fat.get("per_device_batch_size", 0)
  if not is_int_at_least(per_device, 0):
    problems.append(("per_device_batch_size", per_device, "must be an integer >= 0 (0: use batch_size)"))
  elif not problems:  # batch_size must split over the devices (XLA_FLAGS / the machine decide how many)
    try:
      parallel.global_batch_size(fat, jax.device_count())
    except ValueError as e:
      problems.append(("batch_size", fat.get("batch_size"), str(e)))
  if fat.get("loss") not in training.LOSSES:
    problems.append(("loss", fat.get("loss"), f"choose one of {sorted(training.LOSSES)}"))
  schedules = ("cosine_restarts", "reference", "constant")
  if fat.get("schedule") not in schedules:
    problems.append(("schedule", fat.get("schedule"), f"choose one of {schedules}"))
  return problems


def row_fat_config(cfg: ml_collections.ConfigDict, row) -> ml_collections.ConfigDict:
  """The fine-tuning settings of one row: ``cfg.fat``, with the row's own values where its ``fat`` is a dict of
  ``cfg.fat`` keys instead of True (``fat=dict(lr=5e-4)``: this row alone at a lower learning rate)."""
  fat = ml_collections.ConfigDict(cfg.fat.to_dict())  # a copy, type-safe: a value of the wrong type raises
  overrides = row.get("fat", False)
  if not isinstance(overrides, bool) and (not overrides or not hasattr(overrides, "items")):
    raise ValueError(f"fat = {overrides!r}: use True, or a non-empty dict of config.fat keys for this row alone")
  for key, value in fat_overrides(row).items():
    if key not in fat:
      raise KeyError(f"fat has no key {key!r} (keys of config.fat: {', '.join(sorted(fat))})")
    fat[key] = value
  return fat


def fat_overrides(row) -> dict:
  """The ``config.fat`` values a row sets for itself: its ``fat`` where that is a dict, else none."""
  overrides = row.get("fat", False)
  return dict(overrides.items()) if hasattr(overrides, "items") else {}


def check_finite(params: Tree, data: Data) -> None:
  """NaN or Inf in the float weights or in an image set would poison calibration and every loss: stop before
  calibrating, naming the tensor or the image."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  for name, value in flat.items():
    value = np.asarray(value)
    bad = ~np.isfinite(value)
    if bad.any():
      raise InputError(f"the float weights contain NaN/Inf: {name} (shape {value.shape}) has {int(bad.sum())} "
                       "non-finite value(s). The checkpoint is damaged or comes from a diverged run: load another "
                       "one (or, for a model trained here, delete its float_checkpoint to retrain it)")
  for name in ("train", "calibration", "holdout", "eval_images"):
    images = getattr(data, name)
    bad = []
    for i in range(0, len(images), 256):  # in chunks: a pool of ImageNet images is gigabytes
      chunk = np.asarray(images[i:i + 256])
      bad.extend(i + np.flatnonzero(~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)))
    if bad:
      raise InputError(f"{name} set: image {int(bad[0])} (of {len(images)}) contains NaN/Inf, {len(bad)} image(s) in "
                       "all. Check the preprocessing, or delete the image cache ($FATQ_CACHE) if it is damaged")


def _json_default(o):
  if isinstance(o, (np.generic, np.ndarray)):
    return o.tolist()
  raise TypeError(f"not JSON-serialisable: {type(o)}")


def check_labels(labels: np.ndarray, label_offset: int, num_classes: int) -> None:
  """Raise unless ``labels + label_offset`` are classes of the model: labels of another numbering (a label file
  for other classes, 1-based indices, ...) would otherwise score 0 % top-1 without a word."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() + label_offset >= num_classes):
    shifted = f" (+{label_offset} for the model's background class 0)" if label_offset else ""
    raise ValueError(f"labels run from {labels.min()} to {labels.max()}{shifted}, but the model has {num_classes} "
                     f"classes: check the label file (0-based class indices, 0 to {num_classes - label_offset - 1})")


def scores(logits: np.ndarray, labels: np.ndarray, float_logits: np.ndarray | None, label_offset: int = 0) -> dict:
  """top-1, top-5 (when there are > 5 classes), and against the float model's predictions: top-1 agreement and
  ``vs_float``, the images whose top-1 the model ``gained`` (float wrong, this right) and ``lost`` (the reverse).

  ``top1 - float top1 = (gained - lost) / n``, and on a test set of ``n`` images that difference has the standard
  error ``stderr = sqrt(((gained + lost) / n - ((gained - lost) / n)^2) / n)`` (paired outcomes, McNemar): on 1000
  images with 20 changed answers about 0.45 points, the scale of a difference that one run can show."""
  labels = labels + label_offset
  pred = logits.argmax(-1)
  right = pred == labels
  out = {"top1": float(np.mean(right))}
  if logits.shape[-1] > 5:
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    out["top5"] = float(np.mean(np.any(top5 == labels[:, None], axis=-1)))
  if float_logits is not None:
    float_pred = float_logits.argmax(-1)
    float_right = float_pred == labels
    out["agreement"] = float(np.mean(pred == float_pred))
    gained, lost, n = int(np.sum(right & ~float_right)), int(np.sum(float_right & ~right)), len(pred)
    stderr = np.sqrt(max((gained + lost) / n - ((gained - lost) / n) ** 2, 0.0) / n)
    out["vs_float"] = {"gained": gained, "lost": lost, "stderr": float(stderr)}
  return out


# Row keys of data-free quantization (fatq.equalize), applied to the float params before calibration:
# ``equalize`` (cross-layer equalization: True keeps ReLU6 exact with per-channel bounds; 'relu' runs ReLU6 models
# with ReLU instead, as the paper did, which TFLite can export) and ``bias_correction`` (default: on when
# ``equalize`` is, i.e. ``equalize=True`` is the paper's CLE + bias correction; ``'tracked'``: the correction is also
# kept true while FAT moves the weight grids, QuantConfig.track_bias_correction).
DFQ_KEYS = ("equalize", "bias_correction")
EQUALIZE_MODES = (False, True, "relu")
BIAS_CORRECTION_MODES = (False, True, "tracked")


def quant_config(row: ml_collections.ConfigDict, base_rules=()) -> QuantConfig:
  """The QuantConfig of one experiment row; ``base_rules`` (e.g. the 8-bit input image) take precedence."""
  opts = {k: v for k, v in row.items() if k not in ("fat", "name", *DFQ_KEYS)}
  cfg = QuantConfig.from_dict(opts)
  return dataclasses.replace(cfg, rules=tuple(base_rules) + cfg.rules,
                             track_bias_correction=row.get("bias_correction", False) == "tracked")


def _may_train(row) -> bool:
  """Whether a row has something for FAT to learn: trainable factors, a rule that makes some trainable, or bias
  offsets."""
  rules = row.get("rules", None) or ()
  return bool(row.get("trainable", True) or row.get("learn_biases", False)
              or any(spec is not None and spec.get("trainable", True) for _, spec in rules))


def row_name(row) -> str:
  if row.get("name"):
    return row["name"]
  gran = "channel" if row.get("per_channel", False) else "tensor"
  w_sym = row.get("symmetric", True)
  a_sym = row.get("act_symmetric", w_sym)
  sym = ("sym" if w_sym else "asym") if w_sym == a_sym or not row.get("act_bits", 8) else \
      f"{'sym' if w_sym else 'asym'}W-{'sym' if a_sym else 'asym'}A"

  def calibrated(key: str, prefix: str) -> str:  # '-mse', '-actmse', '-p99.99', '-actp99.99'
    method, p = row.get(key, "minmax"), row.get("percentile", QuantSpec.percentile)
    tag = (f"p{p:g}" if isinstance(p, (int, float)) else f"p{p}") if method == "percentile" else method
    return "" if method == "minmax" else f"-{prefix}{tag}"

  searched = calibrated("weight_calibration", "") + calibrated("act_calibration", "act")
  learned = "-learnbias" if row.get("learn_biases", False) else ""
  tuned = "".join(f"-{key}{value:g}" if isinstance(value, float) else f"-{key}{value}"  # the row's own settings
                  for key, value in fat_overrides(row).items())
  return (f"W{row.get('weight_bits', 8) or 32}A{row.get('act_bits', 8) or 32}-{gran}-{sym}{searched}{dfq_suffix(row)}"
          f"{learned}{tuned}")


def dfq_suffix(row) -> str:
  """'-cle' (equalization + bias correction), '-cle-relu' (the same, ReLU6 -> ReLU), '-cle-nobc' (equalization
  alone), '-bc' (bias correction alone), then '-tracked' where the correction is tracked through fine-tuning."""
  eq = bool(row.get("equalize", False))
  bc = row.get("bias_correction", eq)
  return (("-cle" if eq else "") + ("-relu" if row.get("equalize") == "relu" else "")
          + ("-nobc" if eq and not bc else "") + ("-bc" if bc and not eq else "")
          + ("-tracked" if bc == "tracked" else ""))


def check_rules(cfg: ml_collections.ConfigDict, model, sample: np.ndarray) -> None:
  """Raise :class:`InputError` where a row's quantization rule or ``learn_biases`` pattern matches no point of the
  model or never applies (:meth:`fatq.config.QuantConfig.check_matches`): before any row's work."""
  names: dict = {}
  for i, row in enumerate(cfg.get("rows", None) or []):
    m = row_model(model, row)
    if m not in names:
      names[m] = calibration.point_names(m, sample)
    try:
      quant_config(row, base_rules(cfg)).check_matches(names[m])
    except ValueError as e:
      raise InputError(f"config.rows[{i}] ({row_name(row)}): {e}") from None


def row_model(model, row):
  """The float model a row quantizes: with ``equalize='relu'`` MobileNets run with ReLU instead of ReLU6 (their
  ``relu6_clip`` switch; fatq.equalize), otherwise ``model``."""
  if row.get("equalize", False) == "relu" and hasattr(model, "relu6_clip"):
    return model.clone(relu6_clip=False)
  return model


def row_params(row, qmodel, params: Tree, calibration_images: np.ndarray, batch_size: int,
               equalized: dict | None = None) -> tuple[Tree, dict]:
  """The float params a row calibrates: ``params`` equalized and / or bias-corrected as the row says. ``qmodel``:
  :func:`row_model` with the row's quantization; ``equalized``: a dict that keeps the equalized params of each
  ``equalize`` mode for the next rows of the same model (filled here). Returns ``(params, info)``, ``info`` a
  JSON-able summary (empty for a plain row)."""
  info = {}
  mode = row.get("equalize", False)
  if mode:
    equalized = {} if equalized is None else equalized
    if mode not in equalized:  # the same for every row: equalization does not depend on the quantization
      equalized[mode] = equalize.equalize(qmodel.clone(quant=None), params, calibration_images.shape[1:])
    params, report = equalized[mode]
    info["equalize"] = dict(pairs=len(report["pairs"]), skipped=len(report["skipped"]), sweeps=report["sweeps"],
                            relu6_to_relu=mode == "relu" and hasattr(qmodel, "relu6_clip"))
  if row.get("bias_correction", row.get("equalize", False)):
    params, shifts = equalize.correct_bias(qmodel, params, list(_batches(calibration_images, batch_size)))
    info["bias_correction"] = dict(layers=len(shifts), max_abs=max(shifts.values(), default=0.0))
  return params, info


def base_rules(cfg) -> tuple[QuantRule, ...]:
  """Rules every row shares: the input image at a fixed 8 bits (it *is* 8-bit data) unless configured otherwise."""
  bits = cfg.get("input_bits", 8)
  if not bits:
    return (QuantRule("input", None),)
  return (QuantRule("input", QuantSpec(bits=bits, symmetric=False, trainable=False)),)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the ``experiments/finetune.py`` run in ``workdir`` (its ``results.json``), for the tools that
  read such a run (export, agreement, comparison); raises InputError naming the file when it is not one."""
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    raise InputError(f"{path} not found: run experiments/finetune.py with --workdir {workdir} first")
  try:
    with open(path) as f:
      stored = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path} is not a readable results file ({e}): is {workdir} a finetune.py workdir?") from None
  if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict) or \
      not isinstance(stored["config"].get("rows"), list):
    raise InputError(f"{path} holds no finetune.py config (with rows): {workdir} is not an experiments/finetune.py "
                     "workdir (other tools' results.json, e.g. evaluate.py's, compare_tflite's or the workbench's, "
                     "cannot be exported from)")
  return ml_collections.ConfigDict(stored["config"])


# Config keys that change how a run computes, not what: a resumed run may give them other values.
RESUMABLE_CHANGES = ("eval_batch_size", "fat.checkpoint_every", "data.cache_dir")


def check_resume(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError if ``workdir/results.json`` was written with another config than ``cfg``: its finished rows,
  and the training state of an interrupted one, belong to the earlier values. Keys of RESUMABLE_CHANGES may differ,
  and rows the earlier run did not have may be added (rows are matched by name). With ``per_device_batch_size`` the
  global batch is a function of the device count as well, which results.json records: another count is refused."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      stored = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"--resume: {path} is damaged ({e}); its finished rows cannot be read. Run again without "
                     "--resume (or in a new --workdir) to start over") from None
  previous = stored.get("config") if isinstance(stored, dict) else None
  if previous is None:
    return
  as_stored = json.loads(json.dumps(cfg.to_dict(), default=_json_default))  # tuples as lists, as results.json has
  changed = changed_values(_flat_values(previous), _flat_values(as_stored), ignore=RESUMABLE_CHANGES)
  old_rows = {row_name(r): r for r in previous.get("rows", [])}
  changed += [f"row {row_name(r)} {old_rows[row_name(r)]} -> {r}" for r in as_stored.get("rows", [])
              if row_name(r) in old_rows and old_rows[row_name(r)] != r]
  if changed:
    more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
    raise ValueError(f"--resume with another config than the one that wrote {path}: {'; '.join(changed[:4])}{more}. "
                     "Its rows were computed with the earlier values: resume with the same config and overrides, or "
                     "run the changed config in a new --workdir")
  devices, before = jax.device_count(), stored.get("devices")
  if before not in (None, devices):  # per_device_batch_size: the global batch changes with the device count
    changed = sorted({(a, b) for a, b in zip(_global_batches(cfg, before), _global_batches(cfg, devices)) if a != b})
    if changed:
      raise ValueError(
          f"--resume on {devices} device(s) of a run made on {before} ({path}): with per_device_batch_size the global "
          f"batch would be {', '.join(f'{b} instead of {a}' for a, b in changed)}, and its rows were trained with the "
          f"earlier one. Resume on {before} device(s), or run in a new --workdir")


def _global_batches(cfg: ml_collections.ConfigDict, devices: int) -> list[int]:
  """The global training batch of ``cfg.fat`` and of each row's own fine-tuning settings on ``devices`` devices."""
  if cfg.get("fat") is None:
    return []
  fats = [cfg.fat] + [row_fat_config(cfg, r) for r in cfg.rows if fat_overrides(r)]
  return [parallel.global_batch_size(fat, devices) for fat in fats]


def changed_values(old: dict, new: dict, ignore=()) -> list[str]:
  """``'key old -> new'`` for each key of two flat dicts whose value differs or that one of them lacks (shown as
  ``'(none)'``), in key order, ``ignore`` left out."""
  return [f"{key} {old.get(key, '(none)')!r} -> {new.get(key, '(none)')!r}" for key in sorted(old.keys() | new.keys())
          if key not in ignore and (key in old, old.get(key)) != (key in new, new.get(key))]


def _flat_values(config: dict, prefix: str = "") -> dict[str, Any]:
  """A config dict's values by dotted key, without ``rows`` (which :func:`check_resume` compares by name)."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(_flat_values(value, prefix + key + "."))
    elif prefix or key != "rows":
      flat[prefix + key] = value
  return flat


def run(cfg: ml_collections.ConfigDict, model, params: Tree, data: Data, workdir: str, *, resume: bool = False,
        log: Callable[[str], None] = print, progress: bool = True) -> dict:
  """Evaluate float, then PTQ (and FAT where ``row.fat``) for every row of ``cfg.rows``; return the results dict.

  A row with ``equalize`` / ``bias_correction`` (:data:`DFQ_KEYS`) calibrates params prepared by
  :func:`row_params` on :func:`row_model`; its teacher (for FAT) and the agreement reference stay the original
  float model. Checks the config and that weights and images are finite before any work. A full disk while saving raises an
  ``OSError(ENOSPC)`` that says to continue with ``resume=True``; ``results.json`` keeps every finished row.
  """
  check_config(cfg)
  check_finite(params, data)
  check_rules(cfg, model, data.calibration[:1])
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, "results.json")
  results = {"model": cfg.model.name, "dataset": cfg.data.name, "sources": data.sources, "rows": [],
             "config": cfg.to_dict(), "devices": jax.device_count(), "timings": {}}
  if resume:
    check_resume(cfg, workdir)
  if resume and os.path.exists(results_path):
    with open(results_path) as f:
      previous = json.load(f)
    results["rows"], results["timings"] = previous.get("rows", []), previous.get("timings", {})
    log(f"resuming: {len(results['rows'])} row(s) already in {results_path}")
    # A fine-tuned row is done once its checkpoint is there too (what export reads): one deleted as damaged is
    # computed again, from the row's last training state.
    lost = [r for r in results["rows"] if r["method"] == "fat"
            and not os.path.isdir(os.path.join(workdir, "rows", r["name"], "checkpoint"))]
    if lost:
      log(f"fine-tuning again, as their checkpoints are missing: {', '.join(r['name'] for r in lost)}")
      results["rows"] = [r for r in results["rows"] if r not in lost]
  elif resume:
    log(f"nothing to resume in {workdir} (no results.json): starting a new run")
  else:  # a new run: files an earlier run left for these rows would be resumed or exported as this run's
    stale = [name for name in map(row_name, cfg.rows) if os.path.exists(os.path.join(workdir, "rows", name))]
    for name in stale:
      shutil.rmtree(os.path.join(workdir, "rows", name))
    if stale:
      log(f"a new run (no --resume): removed what an earlier run left in {os.path.join(workdir, 'rows')} for "
          f"{len(stale)} row(s)")
  done = {(r["name"], r["method"]) for r in results["rows"]}

  def add(name, method, spec_row, metrics, seconds):
    entry = {"name": name, "method": method,
             "weight_bits": 32 if spec_row is None else (spec_row.get("weight_bits", 8) or 32),
             "act_bits": 32 if spec_row is None else (spec_row.get("act_bits", 8) or 32),
             "granularity": "channel" if spec_row is not None and spec_row.get("per_channel", False) else "tensor",
             "symmetric": True if spec_row is None else bool(spec_row.get("symmetric", True)),
             "act_symmetric": True if spec_row is None else bool(spec_row.get("act_symmetric",
                                                                               spec_row.get("symmetric", True))),
             **metrics, "seconds": round(seconds, 2)}
    with _saving(results_path, workdir):
      atomic_write_json(results_path, {**results, "rows": results["rows"] + [entry],
                                       "timings": {**results["timings"], f"{name}/{method}": round(seconds, 2)}})
    results["rows"].append(entry)  # only once it is on disk
    results["timings"][f"{name}/{method}"] = round(seconds, 2)
    log(format_row(entry))

  eval_x, eval_y, off = data.eval_images, data.eval_labels, data.label_offset
  bs = cfg.get("eval_batch_size", 256)
  t0 = time.perf_counter()
  float_logits = training.predict(model, {"params": params}, eval_x, bs)
  check_labels(eval_y, off, float_logits.shape[-1])  # for callers that build Data themselves
  if ("float", "float") not in done:
    add("float", "float", None, scores(float_logits, eval_y, float_logits, off), time.perf_counter() - t0)
  teacher_train = teacher_holdout = None
  equalized, equalized_float = {}, {}  # per equalize mode, shared by the rows that equalize

  for row in cfg.rows:
    name = row_name(row)
    methods = ["ptq"] + (["fat"] if row.get("fat", False) else [])
    if all((name, m) in done for m in methods):
      continue
    qmodel = row_model(model, row).clone(quant=quant_config(row, base_rules(cfg)))
    t0 = time.perf_counter()
    qparams, dfq = row_params(row, qmodel, params, data.calibration, cfg.calibration.batch_size, equalized)
    if row.get("equalize", False) and (name, "ptq") not in done:
      # The equalized float model's scores: the top-1 an equalized row can approach (the float model's itself, up
      # to float32 rounding, unless ReLU6 -> ReLU changed the function). Once per mode, not in the row's seconds.
      mode = row.get("equalize")
      if mode not in equalized_float:
        t1 = time.perf_counter()
        logits = training.predict(qmodel.clone(quant=None), {"params": equalized[mode][0]}, eval_x, bs)
        equalized_float[mode] = scores(logits, eval_y, float_logits, off)
        t0 += time.perf_counter() - t1
      dfq["equalized_float"] = equalized_float[mode]
    if dfq:
      log(f"{name}: {json.dumps(dfq)}")
    stats = calibration.calibrate(qmodel, qparams, _batches(data.calibration, cfg.calibration.batch_size))
    frozen = {"params": qparams, STATS: stats}
    if (name, "ptq") not in done:
      logits = training.predict(qmodel, frozen, eval_x, bs)
      add(name, "ptq", row, {**scores(logits, eval_y, float_logits, off), **dfq}, time.perf_counter() - t0)
    if "fat" not in methods or (name, "fat") in done:
      continue
    t0 = time.perf_counter()
    if teacher_train is None:  # the teacher's logits, once per image, shared by every row
      teacher_train = training.predict(model, {"params": params}, data.train, bs)
      teacher_holdout = training.predict(model, {"params": params}, data.holdout, bs)
    thresholds = calibration.init_thresholds(qmodel, qparams, stats, data.calibration[:1])
    offsets = calibration.count(layers.bias_offsets(thresholds))
    log(f"{name}: fine-tuning {calibration.count(thresholds) - offsets} threshold factors"
        f"{f' and {offsets} bias offsets' if offsets else ''} on {len(data.train)} unlabeled images")
    row_dir = os.path.join(workdir, "rows", name)
    os.makedirs(row_dir, exist_ok=True)
    best, history = training.finetune(qmodel, frozen, thresholds, data.train, teacher_train,
                                      (data.holdout, teacher_holdout), row_fat_config(cfg, row), workdir=row_dir,
                                      resume=resume, log=log, progress=progress)
    # learned bias offsets and tracked bias corrections into the biases
    variables = layers.fold_biases(qmodel, {**frozen, THRESHOLDS: best}, data.calibration[:1])
    with _saving(os.path.join(row_dir, "checkpoint"), workdir):
      save_variables(os.path.join(row_dir, "checkpoint"), variables)
    if history:
      plots.plot_training(history, os.path.join(row_dir, "training.png"), title=name)
      plots.plot_activation_ranges(qmodel, {**frozen, THRESHOLDS: thresholds}, variables, data.calibration[:32],
                                   os.path.join(row_dir, "activation_ranges.png"))
    logits = training.predict(qmodel, variables, eval_x, bs)
    metrics = scores(logits, eval_y, float_logits, off)
    if history:  # none where the rules leave no point trainable
      metrics["holdout_loss"] = {"initial": history[0]["holdout_loss"],
                                 "best": min(h["holdout_loss"] for h in history)}
    add(name, "fat", row, metrics, time.perf_counter() - t0)
  return results


def save_variables(path: str, variables: Tree) -> None:
  """Orbax checkpoint of ``{'params', 'quant_stats', 'quant'}`` (overwrites)."""
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(path), jax.tree.map(np.asarray, variables), force=True)


def load_variables(path: str) -> Tree:
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}: run experiments/finetune.py with this --workdir first")
  try:
    with ocp.StandardCheckpointer() as ckpt:
      return ckpt.restore(path)
  except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types for a damaged directory
    raise ValueError(f"cannot read the checkpoint at {path} ({type(e).__name__}: {str(e)[:300]}): it is incomplete "
                     "(a crash or a full disk while it was written) or not an orbax checkpoint. Delete it to have "
                     "it computed again, or point to another one") from None


def _batches(images: np.ndarray, batch_size: int):
  for i in range(0, len(images), batch_size):
    yield images[i:i + batch_size]


def format_row(r: dict) -> str:
  top5 = f"{100 * r['top5']:6.2f}" if "top5" in r else "     -"
  agree = f"{100 * r['agreement']:6.2f}" if "agreement" in r else "     -"
  v = r.get("vs_float")
  flips = f"+{v['gained']} -{v['lost']} ({100 * v['stderr']:.2f})" if v else "-"
  return (f"{r['name']:<24} {r['method']:<6} W{r['weight_bits']:<2} A{r['act_bits']:<2} {r['granularity']:<7} "
          f"{'sym' if r['symmetric'] else 'asym':<4} {100 * r['top1']:6.2f} {top5} {agree} {flips:>18} "
          f"{r['seconds']:8.1f}")


def table(results: dict) -> str:
  head = (f"{'row':<24} {'method':<6} {'W':<3} {'A':<3} {'gran':<7} {'sym':<4} {'top1':>6} {'top5':>6} "
          f"{'agree':>6} {'vs float (stderr)':>18} {'seconds':>8}")
  lines = [f"{results['model']} on {results['dataset']}", head, "-" * len(head)]
  return "\n".join(lines + [format_row(r) for r in results["rows"]])
