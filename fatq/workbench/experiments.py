"""The workbench experiments behind ``experiments/sweep.py``. ``cfg.experiment`` picks one of :data:`RUNNERS`;
each returns ``(results, table_text)`` after writing its plot(s) beside ``results.json`` in ``workdir``.

Tasks (``cfg.tasks``: a list of dicts): ``{'model': 'lenet5', 'dataset': 'mnist' | 'fashion_mnist'}`` trains the
float LeNet-5 once (cached in ``<workdir>/<task>/float_checkpoint``, or ``checkpoint``) on ``float_limit`` labeled
images; ``{'model': 'mobilenet_v1_0.75'}`` loads the Keras/tfjs checkpoint in ../shared/data/models and uses
``num_eval`` ImageNet validation images (and the unlabeled pool for calibration / fine-tuning): the embedded folders,
or those the task names with the keys of a config's data section (``val_dir``, ``unlabeled_dir``, ``tfds_name``,
...: :func:`imagenet_data`).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fatq import calibration, training
from fatq.config import QuantConfig, QuantRule, QuantSpec
from fatq.experiment import Data, atomic_write_json, check_labels, is_int_at_least, load_variables, scores
from fatq.layers import STATS, THRESHOLDS
from fatq.workbench import analysis

Tree = Any


# ---------------------------------------------------------------------------------------------------------------------
# Tasks.


class Task:
  def __init__(self, name, model, params, data: Data, train_labels=None, input_shape=(28, 28, 1)):
    self.name, self.model, self.params, self.data = name, model, params, data
    self.train_labels, self.input_shape = train_labels, input_shape
    self._float_logits = None

  def float_logits(self, bs):
    if self._float_logits is None:
      self._float_logits = training.predict(self.model, {"params": self.params}, self.data.eval_images, bs)
    return self._float_logits


def task_name(t) -> str:
  return f"{t['model']}_{t['dataset']}" if t.get("dataset") else t["model"]


def load_task(t, workdir: str, seed: int = 0, log=print, need_data: bool = True) -> Task:
  t = dict(t)
  if t["model"] == "lenet5":
    return _lenet5(t, workdir, seed, log)
  if t["model"].startswith("mobilenet_v1"):
    return _mobilenet(t, seed, log, need_data)
  raise ValueError(f"unknown task model {t['model']!r}; known: 'lenet5', 'mobilenet_v1_0.75'")


def _lenet5(t, workdir, seed, log):
  from fatq.data import idx
  from fatq.models import LeNet5
  from fatq.tasks import cached_float_params, split_unlabeled

  ds = t.get("dataset", "mnist")
  train_x, train_y = idx.load(ds, "train", t.get("data_dir") or None)
  test_x, test_y = idx.load(ds, "test", t.get("data_dir") or None)
  for labels in (train_y, test_y):  # a user's data_dir: before the float model trains on them
    check_labels(labels, 0, 10)
  model = LeNet5(num_classes=10)
  ckpt = t.get("checkpoint") or os.path.join(workdir, task_name(t), "float_checkpoint")
  n = t.get("float_limit", 0) or len(train_x)

  def train():
    log(f"{task_name(t)}: training the float LeNet-5, {t.get('float_epochs', 3)} epochs on {n} labeled images")
    return training.train_classifier(model, train_x[:n], train_y[:n], epochs=t.get("float_epochs", 3),
                                     batch_size=128, lr=1e-3, seed=seed, log=log, progress=False)

  if t.get("checkpoint") and os.path.isdir(ckpt):  # a user's model: used as it is
    params, loaded = load_variables(ckpt)["params"], True
  else:  # what the float model depends on is stored beside it: another setting trains it again
    settings = dict(data=ds, data_dir=t.get("data_dir", ""), epochs=t.get("float_epochs", 3), images=n,
                    batch_size=128, lr=1e-3, seed=seed)
    params, loaded = cached_float_params(ckpt, settings, train, log, f"{task_name(t)}: float LeNet-5")
  if loaded:
    log(f"{task_name(t)}: float LeNet-5 loaded from {ckpt}")
  cfg_data = ml_collections.ConfigDict(dict(num_train=t.get("num_train", 10000),
                                            num_calibration=t.get("num_calibration", 100),
                                            num_holdout=t.get("num_holdout", 1000)))
  tr, cal, hold = split_unlabeled(np.arange(len(train_x)), cfg_data, seed)
  n_eval = t.get("num_eval", 0) or len(test_x)
  data = Data(train=train_x[tr], calibration=train_x[cal], holdout=train_x[hold], eval_images=test_x[:n_eval],
              eval_labels=test_y[:n_eval], sources=_sources(t))
  return Task(task_name(t), model, params, data, train_labels=train_y[tr])


def _mobilenet(t, seed, log, need_data):
  from fatq import models
  from fatq.data import imagenet
  from fatq.data.paths import data_root
  from fatq.tasks import split_unlabeled

  width = float(t["model"].rsplit("_", 1)[1])
  cfg = dict(name="mobilenet_v1", width=width, num_classes=1000, checkpoint_format="tfjs", image_size=224,
             impl=t.get("impl", "fast"),
             checkpoint=t.get("checkpoint") or os.path.join(data_root(), f"models/mobilenet_v1_{width}_224_keras_tfjs"))
  model, params, _ = models.load(cfg)
  if not need_data:
    return Task(task_name(t), model, params, None, input_shape=(224, 224, 3))
  d = imagenet_data(t)
  val = imagenet.evaluation_set(d, limit=t.get("num_eval", 500) or None, progress=False)
  check_labels(val.labels, 0, cfg["num_classes"])  # a user's label file of another numbering: not 0 % top-1
  pool = imagenet.unlabeled_pool(d, progress=False).images
  cfg_data = ml_collections.ConfigDict(dict(num_train=t.get("num_train", 400),
                                            num_calibration=t.get("num_calibration", 100),
                                            num_holdout=t.get("num_holdout", 100)))
  tr, cal, hold = split_unlabeled(pool, cfg_data, seed)
  log(f"{task_name(t)}: {len(val.images)} validation images, {len(tr)} unlabeled training images")
  return Task(task_name(t), model, params, Data(train=tr, calibration=cal, holdout=hold, eval_images=val.images,
                                                eval_labels=val.labels, sources=imagenet.sources(d)),
              input_shape=(224, 224, 3))


def imagenet_data(t) -> ml_collections.ConfigDict:
  """A MobileNet task's ``data`` section: the embedded folders, or the task's own keys of
  :func:`fatq.data.imagenet.data_config` (``val_dir``, ``unlabeled_dir``, ``tfds_name``, ``cache_dir``, ...)."""
  from fatq.data import imagenet

  keys = set(imagenet.data_config()) - {"preprocessing", "image_size"}  # fixed by the model: 'fat' at 224 px
  return ml_collections.ConfigDict(imagenet.data_config("fat", 224, **{k: v for k, v in t.items() if k in keys}))


def _dataset(t) -> str:
  """What results.json names as a task's data: its ``dataset``, or where a MobileNet task's evaluation images are."""
  from fatq.data import imagenet

  if t.get("dataset"):
    return t["dataset"]
  return "-" if t["model"] == "lenet5" else imagenet.evaluation_source(imagenet_data(t))


def _sources(t) -> dict[str, str]:
  """``{'unlabeled': ..., 'evaluation': ...}``: where a task reads each set, as the main experiment records them."""
  from fatq.data import idx, imagenet

  if t["model"] != "lenet5":
    return imagenet.sources(imagenet_data(t))
  return idx.sources(t.get("dataset", "mnist"), t.get("data_dir") or None)


def _batches(x, bs):
  for i in range(0, len(x), bs):
    yield x[i:i + bs]


def evaluate(task: Task, quant: QuantConfig | None, bs: int, calib: np.ndarray | None = None,
             thresholds: Tree | None = None, rngs=None) -> tuple[dict, Tree | None]:
  """Scores of ``task.model`` under ``quant`` calibrated on ``calib`` (default: one zero image, enough for
  weight-only and fixed-point configs, which need no activation statistics). Returns ``(metrics, variables)``."""
  if quant is None:
    logits = task.float_logits(bs)
    return scores(logits, task.data.eval_labels, logits), {"params": task.params}
  qmodel = task.model.clone(quant=quant)
  if calib is None:
    calib = np.zeros((1, *task.input_shape), np.float32)
  stats = calibration.calibrate(qmodel, task.params, _batches(calib, bs))
  variables = {"params": task.params, STATS: stats}
  if thresholds is not None:
    variables[THRESHOLDS] = thresholds
  logits = training.predict(qmodel, variables, task.data.eval_images, bs)
  return scores(logits, task.data.eval_labels, task.float_logits(bs)), variables


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path):
  """``fig`` as a PNG at ``path``, then closed (pyplot keeps every figure open until then)."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  _plt().close(fig)


def _table(head, lines):
  """``head``, a rule under it, then ``lines``: the readable table an experiment prints."""
  return "\n".join([head, "-" * len(head), *lines])


def weight_rules(spec) -> QuantConfig:
  return QuantConfig((QuantRule(r".*kernel", spec), QuantRule(r".*", None)))


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data-free weight sweep (bit-efficient-quantization.txt Tables 1, 3, 5).


def run_datafree(cfg, workdir, log=print):
  rows, timings = [], {}
  bs = cfg.get("eval_batch_size", 250)
  for t in cfg.tasks:
    t0 = time.perf_counter()
    task = load_task(t, workdir, cfg.seed, log)
    kernels = [np.asarray(l["kernel"]) for _, l in analysis_layers(task.params)]
    biases = [np.asarray(l["bias"]) for _, l in analysis_layers(task.params) if "bias" in l]
    m, _ = evaluate(task, None, bs)
    size = analysis.model_size(kernels, biases, None)
    rows.append(dict(task=task.name, method="float", bits=32, **m, size=size))
    log(_fmt_df(rows[-1]))
    for method in cfg.methods:
      for bits in cfg.bits:
        t1 = time.perf_counter()
        m, _ = evaluate(task, weight_rules(analysis.weight_spec(method, bits, cfg.per_channel)), bs)
        qk = [analysis.quantize_weight(k, method, bits, cfg.per_channel) for k in kernels]
        size = analysis.model_size(qk, biases, bits, cfg.per_channel)
        rows.append(dict(task=task.name, method=method, bits=bits, **m, size=size,
                         seconds=round(time.perf_counter() - t1, 2)))
        log(_fmt_df(rows[-1]))
    timings[task.name] = round(time.perf_counter() - t0, 1)
  plt = _plt()
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
  for ax, name in zip(axes[0], tasks):
    fl = [r for r in rows if r["task"] == name and r["method"] == "float"][0]
    ax.axhline(100 * fl["top1"], color="k", ls="--", label="float")
    for method in cfg.methods:
      rs = [r for r in rows if r["task"] == name and r["method"] == method]
      ax.plot([r["bits"] for r in rs], [100 * r["top1"] for r in rs], "o-", label=method)
    ax.set(title=name, xlabel="weight bits", ylabel="top-1 %")
    ax.legend()
  fig.suptitle("data-free weight quantization (activations float)")
  _save(fig, os.path.join(workdir, "datafree.png"))
  head = f"{'task':<22} {'method':<6} {'bits':>4} {'top1':>6} {'agree':>6} {'raw KB':>9} {'gzip KB':>9} {'lzma KB':>9}"
  return dict(rows=rows, timings=timings), _table(head, map(_fmt_df, rows))


def analysis_layers(params, model=None, input_shape=None):
  """``(path, {'kernel', 'bias'})`` of every conv / dense layer; in execution order when ``model`` and
  ``input_shape`` are given (a loaded checkpoint's params are key-sorted: block1, block10, ..., conv1)."""
  from fatq.models.common import layers

  out = layers(params)
  if model is not None:
    order = {name: i for i, name in enumerate(analysis.call_order(model, params, input_shape))}
    out = sorted(out, key=lambda pl: order.get(pl[0], len(order)))
  return out


def _fmt_df(r):
  s = r["size"]
  return (f"{r['task']:<22} {r['method']:<6} {r['bits']:>4} {100 * r['top1']:6.2f} {100 * r['agreement']:6.2f} "
          f"{s['raw'] / 1e3:9.1f} {s['gzip'] / 1e3:9.1f} {s['lzma'] / 1e3:9.1f}")


# ---------------------------------------------------------------------------------------------------------------------
# 2. Fixed-point word-width sweep (TensorQuant).


def run_fixed_point(cfg, workdir, log=print):
  rows, timings = [], {}
  bs = cfg.get("eval_batch_size", 500)
  for t in cfg.tasks:
    t0 = time.perf_counter()
    task = load_task(t, workdir, cfg.seed, log)
    fl, _ = evaluate(task, None, bs)
    rows.append(dict(task=task.name, placement="float", rounding="-", word_bits=32, frac_bits=0, **fl,
                     relative=1.0))
    for placement in cfg.placements:
      for rounding in cfg.roundings:
        for w in cfg.word_bits:
          f = w // 2 if cfg.frac_bits == "half" else int(cfg.frac_bits)
          spec = QuantSpec(bits=w, kind="fixed_point", frac_bits=f, rounding=rounding, placement=placement)
          rules = [QuantRule(p, spec) for p in cfg.get("extra_points", ())]
          quant = QuantConfig(tuple(rules) + (QuantRule(r".*output", spec), QuantRule(r".*", None)))
          t1 = time.perf_counter()
          m, _ = evaluate(task, quant, bs)
          rows.append(dict(task=task.name, placement=placement, rounding=rounding, word_bits=w, frac_bits=f, **m,
                           relative=m["top1"] / fl["top1"], seconds=round(time.perf_counter() - t1, 2)))
          log(_fmt_fp(rows[-1]))
    timings[task.name] = round(time.perf_counter() - t0, 1)
  plt = _plt()
  tasks = list(dict.fromkeys(r["task"] for r in rows))  # one panel per task: their lines are not one curve
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
  for ax, name in zip(axes[0], tasks):
    for placement in cfg.placements:
      for rounding in cfg.roundings:
        rs = [r for r in rows if (r["task"], r["placement"], r["rounding"]) == (name, placement, rounding)]
        ax.plot([r["word_bits"] for r in rs], [r["relative"] for r in rs],
                "o-" if placement == "intrinsic" else "s--", label=f"{placement}, {rounding}")
    ax.set(xlabel="word width W (F = W/2)" if cfg.frac_bits == "half" else "word width W",
           ylabel="relative accuracy", title=f"fixed point, {name}")
    ax.legend()
  _save(fig, os.path.join(workdir, "fixed_point.png"))
  head = f"{'task':<20} {'placement':<10} {'rounding':<10} {'W':>3} {'F':>3} {'top1':>6} {'rel':>5}"
  return dict(rows=rows, timings=timings), _table(head, map(_fmt_fp, rows))


def _fmt_fp(r):
  return (f"{r['task']:<20} {r['placement']:<10} {r['rounding']:<10} {r['word_bits']:>3} {r['frac_bits']:>3} "
          f"{100 * r['top1']:6.2f} {r['relative']:5.3f}")


# ---------------------------------------------------------------------------------------------------------------------
# 3. FAT vs LSQ vs PTQ.


def label_cross_entropy(student, onehot):
  """Cross-entropy against one-hot labels passed where the loop expects teacher logits (LSQ with labels)."""
  return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(student), axis=-1))



def _input_rule():
  return QuantRule("input", QuantSpec(bits=8, symmetric=False, trainable=False))


def method_config(method: str, wb: int, ab: int, per_channel: bool) -> QuantConfig:
  if method in ("ptq", "fat"):
    weight = QuantSpec.fat(wb, symmetric=True, per_channel=per_channel)
    act = QuantSpec.fat(ab, symmetric=False)
  elif method == "lsq":
    weight = QuantSpec(bits=wb, kind="lsq", per_channel=per_channel)
    act = QuantSpec(bits=ab, kind="lsq")
  else:
    raise ValueError(f"unknown method {method!r}")
  return QuantConfig((_input_rule(), QuantRule(r".*kernel", weight), QuantRule(r".*", act)))


def run_lsq(cfg, workdir, log=print):
  rows, timings = [], {}
  for t in cfg.tasks:
    t0 = time.perf_counter()
    task = load_task(t, workdir, cfg.seed, log)
    bs = t.get("eval_batch_size", 250)
    d = task.data
    fl, _ = evaluate(task, None, bs)
    rows.append(dict(task=task.name, method="float", setting="W32A32", **fl, seconds=0.0))
    teacher_train = training.predict(task.model, {"params": task.params}, d.train, bs)
    teacher_hold = training.predict(task.model, {"params": task.params}, d.holdout, bs)
    for wb, ab in t["settings"]:
      setting = f"W{wb}A{ab}"
      for method in cfg.methods:
        t1 = time.perf_counter()
        quant = method_config(method, wb, ab, t.get("per_channel", True))
        qmodel = task.model.clone(quant=quant)
        stats = calibration.calibrate(qmodel, task.params, _batches(d.calibration, 50))
        frozen = {"params": task.params, STATS: stats}
        extra = {}
        if method == "ptq":
          variables = frozen
        else:
          train_cfg = ml_collections.ConfigDict(dict(cfg.train))
          train_cfg.update(dict(t.get("train", {})))
          if method == "lsq":
            train_cfg.update(dict(cfg.lsq_train))
          targets, hold_targets, loss_fn = teacher_train, teacher_hold, None
          if method == "lsq" and cfg.lsq_labels and task.train_labels is not None:
            # Labels instead of distillation: cross-entropy with one-hot labels; the held-out loss (which picks the
            # best thresholds) uses the teacher's predicted classes, so no extra labels are needed.
            eye = np.eye(task.model.num_classes, dtype=np.float32)
            targets, hold_targets = eye[task.train_labels], eye[teacher_hold.argmax(-1)]
            train_cfg.loss, loss_fn = "label_ce", label_cross_entropy  # the name: what results.json records
          th = calibration.init_thresholds(qmodel, task.params, stats, d.calibration[:1])
          row_dir = os.path.join(workdir, "rows", task.name, f"{setting}_{method}")
          os.makedirs(row_dir, exist_ok=True)
          best, history = training.finetune(qmodel, frozen, th, d.train, targets, (d.holdout, hold_targets),
                                            train_cfg, workdir=row_dir, log=log, progress=False, loss_fn=loss_fn)
          variables = {**frozen, THRESHOLDS: best}
          extra = dict(steps=history[-1]["step"] if history else 0,
                       holdout_loss=dict(initial=history[0]["holdout_loss"],
                                         best=min(h["holdout_loss"] for h in history)) if history else None,
                       loss=train_cfg.loss)
        logits = training.predict(qmodel, variables, d.eval_images, bs)
        m = scores(logits, d.eval_labels, task.float_logits(bs))
        rows.append(dict(task=task.name, method=method, setting=setting, weight_bits=wb, act_bits=ab, **m, **extra,
                         seconds=round(time.perf_counter() - t1, 1)))
        log(_fmt_lsq(rows[-1]))
    timings[task.name] = round(time.perf_counter() - t0, 1)
  plt = _plt()
  groups = list(dict.fromkeys((r["task"], r["setting"]) for r in rows if r["method"] != "float"))
  fig, ax = plt.subplots(figsize=(max(6, 2 * len(groups)), 4))
  width = 0.8 / len(cfg.methods)
  for i, method in enumerate(cfg.methods):
    vals = [next((100 * r["top1"] for r in rows if (r["task"], r["setting"], r["method"]) == (g[0], g[1], method)),
                 0) for g in groups]
    ax.bar(np.arange(len(groups)) + i * width, vals, width, label=method)
  ax.set_xticks(np.arange(len(groups)) + width * (len(cfg.methods) - 1) / 2)
  ax.set_xticklabels([f"{a}\n{b}" for a, b in groups], fontsize=8)
  ax.set(ylabel="top-1 %", title="PTQ vs FAT vs LSQ")
  ax.legend()
  _save(fig, os.path.join(workdir, "fat_lsq_ptq.png"))
  head = f"{'task':<22} {'setting':<8} {'method':<6} {'top1':>6} {'agree':>6} {'seconds':>8}"
  return dict(rows=rows, timings=timings), _table(head, map(_fmt_lsq, rows))


def _fmt_lsq(r):
  return (f"{r['task']:<22} {r['setting']:<8} {r['method']:<6} {100 * r['top1']:6.2f} {100 * r['agreement']:6.2f} "
          f"{r['seconds']:8.1f}")


# ---------------------------------------------------------------------------------------------------------------------
# 4. Per-layer sensitivity.


def run_sensitivity(cfg, workdir, log=print):
  rows, timings = [], {}
  for t in cfg.tasks:
    t0 = time.perf_counter()
    task = load_task(t, workdir, cfg.seed, log)
    bs = t.get("eval_batch_size", 250)
    fl, _ = evaluate(task, None, bs)
    names = [p for p, _ in analysis_layers(task.params, task.model, task.input_shape)]
    for bits in t["bits"]:
      for layer in names:
        esc = re.escape(layer)
        spec_w = QuantSpec(bits=bits, symmetric=True, per_channel=t.get("per_channel", False), trainable=False)
        spec_a = QuantSpec(bits=bits, symmetric=False, trainable=False) if cfg.quantize_output else None
        quant = QuantConfig((QuantRule(f"{esc}/kernel", spec_w), QuantRule(f"{esc}/output", spec_a),
                             QuantRule(r".*", None)))
        m, _ = evaluate(task, quant, bs, calib=task.data.calibration)
        rows.append(dict(task=task.name, layer=layer, bits=bits, per_channel=bool(t.get("per_channel", False)), **m,
                         drop=fl["top1"] - m["top1"]))
        log(_fmt_sens(rows[-1]))
    rows.append(dict(task=task.name, layer="(float)", bits=32, **fl, drop=0.0))
    timings[task.name] = round(time.perf_counter() - t0, 1)
  plt = _plt()
  keys = list(dict.fromkeys((r["task"], r["bits"]) for r in rows if r["bits"] != 32))
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 0.5 + 0.22 * max(
      sum(1 for r in rows if (r["task"], r["bits"]) == k) for k in keys)), squeeze=False)
  for ax, k in zip(axes[0], keys):
    rs = sorted([r for r in rows if (r["task"], r["bits"]) == k], key=lambda r: r["drop"])
    ax.barh([r["layer"] for r in rs], [100 * r["drop"] for r in rs])
    ax.set(title=f"{k[0]}, {k[1]} bits", xlabel="top-1 drop (points)")
    ax.tick_params(axis="y", labelsize=7)
  _save(fig, os.path.join(workdir, "sensitivity.png"))
  ordered = sorted(rows, key=lambda r: (r["task"], r["bits"], -r["drop"]))
  head = f"{'task':<22} {'bits':>4} {'layer':<22} {'top1':>6} {'drop':>6}"
  return dict(rows=rows, timings=timings), _table(head, map(_fmt_sens, ordered))


def _fmt_sens(r):
  return f"{r['task']:<22} {r['bits']:>4} {r['layer']:<22} {100 * r['top1']:6.2f} {100 * r['drop']:6.2f}"


# ---------------------------------------------------------------------------------------------------------------------
# 5. Bit-efficiency statistics.


def run_bit_efficiency(cfg, workdir, log=print):
  if cfg.quartile_bits not in cfg.bits:  # its rows draw the main plot: a KeyError after all the work before
    raise ValueError(f"config.quartile_bits = {cfg.quartile_bits} is not one of config.bits = {tuple(cfg.bits)}: "
                     "add it there or choose one of them")
  rows, timings, quart = [], {}, {}
  plt = _plt()
  for t in cfg.tasks:
    t0 = time.perf_counter()
    task = load_task(t, workdir, cfg.seed, log, need_data=False) if t["model"] != "lenet5" else \
        load_task(t, workdir, cfg.seed, log)
    layer_list = analysis_layers(task.params, task.model, task.input_shape)
    for path, l in layer_list:
      w = np.asarray(l["kernel"])
      for method in cfg.methods:
        for bits in cfg.bits:
          w_q = analysis.quantize_weight(w, method, bits, cfg.per_channel)
          rows.append(dict(task=task.name, layer=path, method=method, bits=bits, size=int(w.size),
                           **analysis.efficiency(w, w_q, bits, cfg.per_channel)))
    focus = t.get("quartile_layer") or layer_list[len(layer_list) // 2][0]
    w = np.asarray(dict(layer_list)[focus]["kernel"])
    nch = min(cfg.quartile_channels, w.shape[-1])
    b = cfg.quartile_bits
    qs = {"float32": analysis.quartiles(w)[:nch]}
    for method in cfg.methods:
      qs[method] = analysis.quartiles(analysis.quantize_weight(w, method, b, cfg.per_channel))[:nch]
    quart[task.name] = dict(layer=focus, bits=b, quartiles={k: v.tolist() for k, v in qs.items()})
    # Figure 1 of the paper: per-channel quartile ranges, float and each method.
    fig, axes = plt.subplots(1, len(qs), figsize=(4 * len(qs), 3.2), sharey=True)
    for ax, (k, q) in zip(axes, qs.items()):
      x = np.arange(nch)
      ax.vlines(x, q[:, 0], q[:, 4], color="0.6", lw=1)
      ax.vlines(x, q[:, 1], q[:, 3], color="C0", lw=4)
      ax.plot(x, q[:, 2], "k_", ms=6)
      ax.set(title=f"{k}" + ("" if k == "float32" else f" {b}-bit"), xlabel="channel")
    fig.suptitle(f"{task.name} {focus}: per-channel quartiles")
    _save(fig, os.path.join(workdir, f"quartiles_{task.name}.png"))
    # Figure 2: histograms, methods at quartile_bits (left) and asym from 8 to 2 bits (right).
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    left = {f"{method} {b}-bit": analysis.quantize_weight(w, method, b, cfg.per_channel) for method in cfg.methods}
    right = {f"asym {bb}-bit": analysis.quantize_weight(w, "asym", bb, cfg.per_channel)
             for bb in sorted(cfg.bits, reverse=True)}
    # edges over every drawn array: a power-of-two grid reaches past max|w|, and np.histogram drops what lies outside
    every = [w, *left.values(), *right.values()]
    edges = np.linspace(min(a.min() for a in every), max(a.max() for a in every), 101)
    for ax, arrays in ((a1, left), (a2, right)):
      ax.hist(w.ravel(), edges, histtype="step", label="float32", color="k")
      for label, a in arrays.items():
        ax.hist(a.ravel(), edges, histtype="step", label=label)
    a1.set(yscale="log", title=f"{focus}: methods at {b} bits", xlabel="weight")
    a1.legend(fontsize=7)
    a2.set(yscale="log", title=f"{focus}: asym {max(cfg.bits)}..{min(cfg.bits)} bits", xlabel="weight")
    a2.legend(fontsize=7)
    _save(fig, os.path.join(workdir, f"histograms_{task.name}.png"))
    timings[task.name] = round(time.perf_counter() - t0, 1)
  # Main plot: bit efficiency (entropy / bits) per layer and method at quartile_bits.
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.2 * len(tasks)), squeeze=False)
  for (a1, a2), name in zip(axes, tasks):
    layers = list(dict.fromkeys(r["layer"] for r in rows if r["task"] == name))
    for method in cfg.methods:
      rs = {r["layer"]: r for r in rows if r["task"] == name and r["method"] == method and r["bits"] == cfg.quartile_bits}
      a1.plot(range(len(layers)), [rs[l]["bit_efficiency"] for l in layers], "o-", ms=3, label=method)
      a2.plot(range(len(layers)), [rs[l]["range_per_bit"] for l in layers], "o-", ms=3, label=method)
    a1.set(title=f"{name}: bit efficiency (entropy / bits), {cfg.quartile_bits}-bit")
    a2.set(title=f"{name}: dynamic range (octaves) per bit, {cfg.quartile_bits}-bit", yscale="log")
    for ax in (a1, a2):  # layers in execution order
      ax.set_xticks(range(len(layers)))
      ax.set_xticklabels(layers, rotation=90, fontsize=6)
    a1.legend(fontsize=7)
  _save(fig, os.path.join(workdir, "bit_efficiency.png"))
  summary = []
  for name in tasks:
    for method in cfg.methods:
      for bits in cfg.bits:
        rs = [r for r in rows if (r["task"], r["method"], r["bits"]) == (name, method, bits)]
        wts = np.array([r["size"] for r in rs], float)
        summary.append(dict(task=name, method=method, bits=bits, **{
            k: float(np.average([r[k] for r in rs], weights=wts)) for k in
            ("occupancy", "bit_efficiency", "range_fraction", "range_per_bit", "sqnr_db")}))
  head = (f"{'task':<22} {'method':<6} {'bits':>4} {'occup':>6} {'BE':>6} {'rangefr':>7} {'oct/bit':>7} "
          f"{'SQNR dB':>8}   (size-weighted means over layers)")
  lines = [f"{s['task']:<22} {s['method']:<6} {s['bits']:>4} {s['occupancy']:6.3f} {s['bit_efficiency']:6.3f} "
           f"{s['range_fraction']:7.3f} {s['range_per_bit']:7.3f} {s['sqnr_db']:8.2f}" for s in summary]
  return dict(rows=rows, summary=summary, quartiles=quart, timings=timings), _table(head, lines)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Memory model.

SHIPPED = {
    "lenet5": dict(input_shape=(28, 28, 1)),
    "mobilenet_v1_0.25": dict(name="mobilenet_v1", width=0.25, num_classes=1001),
    "mobilenet_v1_0.75": dict(name="mobilenet_v1", width=0.75, num_classes=1000),
    "mobilenet_v2_1.0": dict(name="mobilenet_v2", width=1.0, num_classes=1001),
    "mnasnet_1.0": dict(name="mnasnet", width=1.0, num_classes=1001),
    "mnasnet_1.3": dict(name="mnasnet", width=1.3, num_classes=1001),
}


def build_shipped(name: str):
  from fatq import models

  if name == "lenet5":
    model, shape = models.LeNet5(num_classes=10), (28, 28, 1)
  else:
    model, shape = models.build(SHIPPED[name]), (224, 224, 3)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))["params"]
  return model, params, shape


def model_memory(model, params, input_shape, settings, batch_size, slots):
  n_p = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  acts = analysis.activation_sizes(model, params, input_shape)
  largest = max(a for _, a in acts)
  total = sum(a for _, a in acts)
  return n_p, largest, total, [analysis.memory(n_p, largest, total, wb, ab, batch_size, slots) for wb, ab in settings]


def run_memory(cfg, workdir, log=print):
  rows, timings = [], {}
  for name in cfg.models:
    t0 = time.perf_counter()
    model, params, shape = build_shipped(name)
    n_p, largest, total, mems = model_memory(model, params, shape, [tuple(s) for s in cfg.settings],
                                             cfg.batch_size, cfg.optimizer_slots)
    for m in mems:
      rows.append(dict(model=name, num_params=n_p, largest_activation=largest, all_activations=total, **m))
    timings[name] = round(time.perf_counter() - t0, 1)
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 4))
  settings = list(dict.fromkeys(f"W{r['weight_bits']}A{r['act_bits']}" for r in rows))
  width = 0.8 / len(settings)
  for i, s in enumerate(settings):
    vals = [next(r["inference_total"] for r in rows if r["model"] == n and f"W{r['weight_bits']}A{r['act_bits']}" == s)
            for n in cfg.models]
    ax.bar(np.arange(len(cfg.models)) + i * width, np.array(vals) / 1e6, width, label=s)
  ax.set_xticks(np.arange(len(cfg.models)) + width * (len(settings) - 1) / 2)
  ax.set_xticklabels(cfg.models, fontsize=8)
  ax.set(yscale="log", ylabel="inference memory (MB)", title="memory model (qat-edge-survey): N_p b_p + N_a b_a")
  ax.legend(fontsize=7)
  _save(fig, os.path.join(workdir, "memory.png"))
  head = (f"{'model':<18} {'params':>9} {'max act':>8} {'W':>3} {'A':>3} {'inf MB':>8} {'(param':>8} {'act)':>7} "
          f"{'train MB':>9} (B={cfg.batch_size}, {cfg.optimizer_slots} optimizer slot(s))")
  lines = [f"{r['model']:<18} {r['num_params']:>9} {r['largest_activation']:>8} {r['weight_bits']:>3} "
           f"{r['act_bits']:>3} {r['inference_total'] / 1e6:8.4f} {r['inference_params'] / 1e6:8.4f} "
           f"{r['inference_activation'] / 1e6:7.4f} {r['training_total'] / 1e6:9.2f}" for r in rows]
  return dict(rows=rows, timings=timings), _table(head, lines)


RUNNERS: dict[str, Callable] = dict(datafree=run_datafree, fixed_point=run_fixed_point, lsq=run_lsq,
                                    sensitivity=run_sensitivity, bit_efficiency=run_bit_efficiency,
                                    memory=run_memory)


# (key, least value): batch sizes and counts of a config or of its tasks. Counts are slice bounds, where a negative
# one would quietly drop images from the other end; 0 means "all" for num_eval and float_limit.
_SIZES = (("eval_batch_size", 1), ("batch_size", 1), ("seed", 0), ("num_eval", 0), ("num_train", 0),
          ("num_calibration", 1), ("num_holdout", 1), ("float_epochs", 1), ("float_limit", 0))


def _check_sizes(cfg) -> None:
  """Refuse a size, count, method or bit width that would fail, or silently do something else, only after minutes of
  work."""
  tasks = [(f"tasks[{i}].", t) for i, t in enumerate(cfg.get("tasks") or [])]
  for where, node in [("", cfg), *tasks]:
    for key, least in _SIZES:
      value = node.get(key, None)
      if value is not None and not is_int_at_least(value, least):
        raise ValueError(f"config.{where}{key} = {value!r}: must be an integer >= {least} (set it with "
                         f"--config.{where}{key}=...)")
    bits = node.get("bits", None)
    if bits is not None and not all(is_int_at_least(b, 2) and b <= 16 for b in bits):
      raise ValueError(f"config.{where}bits = {tuple(bits)}: bit widths must be integers in 2..16")
  if cfg.get("experiment") in ("datafree", "bit_efficiency") and cfg.get("methods", None) is not None:
    unknown = [m for m in cfg.methods if m not in analysis.METHODS]
    if unknown:
      raise ValueError(f"config.methods: unknown method(s) {unknown}; choose among {analysis.METHODS}")


def run(cfg, workdir: str, log=print) -> tuple[dict, str]:
  """Run ``cfg.experiment``; write ``workdir/results.json`` (model, dataset, sources, rows, config, timings) and
  the plot."""
  if cfg.experiment not in RUNNERS:
    raise ValueError(f"unknown experiment {cfg.experiment!r}; choose one of {sorted(RUNNERS)}")
  _check_sizes(cfg)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  out, text = RUNNERS[cfg.experiment](cfg, workdir, log)
  tasks = cfg.get("tasks") or [dict(model=m) for m in cfg.get("models", [])]
  results = dict(experiment=cfg.experiment,
                 model=", ".join(dict.fromkeys(t["model"] for t in tasks)),
                 dataset=", ".join(dict.fromkeys(_dataset(t) for t in cfg.get("tasks") or [])) or "-",
                 sources={task_name(t): _sources(t) for t in cfg.get("tasks") or []},  # 'memory' reads no data
                 **{k: v for k, v in out.items() if k != "timings"},
                 config=cfg.to_dict(), timings={**out.get("timings", {}),
                                                "total": round(time.perf_counter() - t0, 1)})
  atomic_write_json(os.path.join(workdir, "results.json"), results)
  return results, text
