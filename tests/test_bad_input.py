"""Bad input: each mistake fails early with a message that names the problem and the fix, and nothing already
computed is lost.

Covered elsewhere (not repeated here): a typo in a quantization option, bits 0 / 33 and inverted bounds of a
QuantSpec, a bad regular expression (test_layers.py::test_spec_validation_messages); checkpoints of another width,
class count or architecture, and files that are not checkpoints (test_loaders.py::test_bad_checkpoints); a missing
ImageNet checkpoint (test_models.py); a missing or empty image folder, grayscale / CMYK / palette / RGBA images and
a corrupt JPEG (test_imagenet_data.py); corrupt and truncated IDX files (test_lenet.py).
"""

import errno
import io
import json
import os
import shutil
import re
import signal
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import fatq
from fatq import cli, experiment, models, tasks
from fatq.data import imagenet
from fatq.models import LeNet5
from scripts.finetune_tiny import TinyMLP  # tests/scripts: the model of the crash-safety tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "experiments", "finetune.py")


def _finetune(workdir, *flags, config="lenet5_mnist.py"):
  return subprocess.run([sys.executable, FINETUNE, "--config", os.path.join(ROOT, "configs", config),
                         "--workdir", str(workdir), "--noprogress", *flags], capture_output=True, text=True,
                        timeout=300)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize("flag,message", [
    ("--config.fat.epoch=2", "error: config has no key 'fat.epoch' (did you mean 'fat.epochs'?)"),
    ("--config.fatt.epochs=2", "error: config has no key 'fatt.epochs' (did you mean 'fat.epochs'?)"),
    ("--config.fat.epochs=abc", "error: config key 'fat.epochs' takes an int (default 4), got 'abc'"),
    ("--config.fat=3", "error: config key 'fat' is a group of keys, not a value: set one of them, e.g. "
                       "--config.fat.batch_size=..., got '3'"),
    ("--config.fat.batch_size=0", "error: config.fat.batch_size = 0: must be a positive integer "
                                  "(set it with --config.fat.batch_size=...)"),
])
def test_bad_config_flag_stops_before_any_work(tmp_path, flag, message):
  out = _finetune(tmp_path / "w", flag)
  assert out.returncode != 0
  assert message in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "w" / "results.json").exists() and not (tmp_path / "w" / "float_checkpoint").exists()


def test_command_line_checked_before_jax_is_imported():
  """The entry points import fatq.cli, which checks the command line and restarts the process (malloc) before JAX is
  imported: fatq's public names are imported on first use, and every one of them is there."""
  script = ("import sys\n"
            "import fatq.cli\n"
            "assert not {'jax', 'flax', 'tensorflow'} & set(sys.modules), sorted(sys.modules)\n"
            "import fatq\n"
            "missing = [n for n in fatq.__all__ if getattr(fatq, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert fatq.calibrate is fatq.calibration.calibrate and 'jax' in sys.modules\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  with pytest.raises(AttributeError, match="module 'fatq' has no attribute 'calibrat'"):
    fatq.calibrat  # noqa: B018 - a typo stays an AttributeError


def test_ctrl_c_ends_an_entry_point_in_one_line():
  """SIGINT while an entry point (``cli.run``) works: one line on stderr and status 130, no traceback."""
  script = ("import signal, sys, time\n"
            "from fatq import cli\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (test_resume.py)\n"
            "def main(argv):\n"
            "  print('working', flush=True)\n"
            "  time.sleep(60)\n"
            "cli.run(main, argv=[sys.argv[0]])\n")
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT)
  assert proc.stdout.readline() == "working\n"
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130
  assert err.strip() == "interrupted (Ctrl-C)"


def test_export_and_evaluate_refuse_mistakes_before_any_work(tmp_path):
  """A wrong --row or count, or a finetune.py run's workdir given to evaluate.py: one line, before data is read (no
  float model trained, nothing written), and the finetune.py results are not overwritten."""
  (tmp_path / "rows" / "W8A8-tensor-sym" / "checkpoint").mkdir(parents=True)
  results = json.dumps(dict(config=dict(rows=[dict(weight_bits=8, act_bits=8, fat=True)])))
  (tmp_path / "results.json").write_text(results)
  evaluated = tmp_path / "evaluated"  # evaluate.py's results.json: a config without rows
  evaluated.mkdir()
  (evaluated / "results.json").write_text(json.dumps(dict(config=dict(model=dict(name="m")), rows=[])))
  cases = [
      ("export_tflite.py", ["--workdir", str(evaluated)], 1, f"{evaluated / 'results.json'} holds no finetune.py "
                                                            "config (with rows)"),
      ("sweep.py", ["--config", "configs/workbench_datafree.py:quick", "--workdir", str(tmp_path)], 1,
       "holds the results of an experiments/finetune.py run, which this would overwrite: choose another --workdir"),
      ("finetune.py", ["--config", "configs/lenet5_mnist.py:quick", "--workdir", str(tmp_path / "new"),
                       "--export_row", "best"], 1,
       "error: --export_row choose what --export exports; add --export, or leave them out"),
      ("export_tflite.py", ["--workdir", str(tmp_path), "--row", "W8A8"], 1,
       "error: choose a row among the fine-tuned rows ['W8A8-tensor-sym'] (got 'W8A8')"),
      ("export_tflite.py", ["--workdir", str(tmp_path), "--threads", "0"], 2, "--threads 0: interpreter threads"),
      ("export_tflite.py", ["--workdir", str(tmp_path), "--limit", "-10"], 2, "--limit -10: must be >= 0"),
      ("export_agreement.py", ["--workdir", str(tmp_path / "none")], 1, "results.json not found: run"),
      ("evaluate.py", ["--config", "configs/mobilenet_v1_0.75.py", "--workdir", str(tmp_path)], 1,
       "holds the results of an experiments/finetune.py run, which this would overwrite: choose another --workdir"),
      # reported after the whole run before
      ("finetune.py", ["--config", "configs/lenet5_mnist.py:quick", "--workdir", str(tmp_path / "new"), "--export",
                       "--export_row", "W3A3-channel"], 1,
       "error: --export_row 'W3A3-channel' is not a fine-tuned row of this config; its fine-tuned rows: "
       "W3A3-channel-symW-asymA"),
      ("finetune.py", ["--config", "configs/lenet5_mnist.py:quick", "--workdir", str(tmp_path / "new"), "--export",
                       "--config.rows[1].fat=False"], 1,
       "error: --export exports fine-tuned rows, and this config has"),
  ]
  for script, args, rc, message in cases:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == rc and message in out.stderr.strip().splitlines()[-1], (script, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
  assert sorted(os.listdir(tmp_path)) == ["evaluated", "results.json", "rows"]
  assert (tmp_path / "results.json").read_text() == results


def test_evaluate_refuses_labels_outside_the_models_classes(tmp_path, imagenet_folders):
  val, _ = imagenet_folders(4, 0)
  lines = (val / "labels.txt").read_text().splitlines()
  (val / "labels.txt").write_text("\n".join(f"{l.split(',')[0]}, {int(l.split(',')[1]) + 1000}" for l in lines))
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"), "--config",
                        "configs/mobilenet_v1_0.25_tflite.py", "--workdir", str(tmp_path / "eval"),
                        f"--config.data.val_dir={val}", f"--config.data.cache_dir={tmp_path / 'cache'}"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "but the model has 1001 classes: check the label file" in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "eval" / "results.json").exists()


def test_resume_names_a_damaged_results_file(tmp_path):
  cfg, *_ = _tiny_experiment()
  (tmp_path / "results.json").write_text('{"rows": [{"name": "unterminated')
  with pytest.raises(experiment.InputError, match=r"--resume: .*results.json is damaged \(.*\); its finished rows "
                                                  r"cannot be read\. Run again without --resume"):
    experiment.check_resume(cfg, str(tmp_path))


@pytest.mark.parametrize("script,args,message", [
    ("finetune.py", ["--config", "configs/lenet5_mnist.py:quik", "--workdir", "W"],
     "error: --config=configs/lenet5_mnist.py:quik: unknown config variant 'quik'; use '', 'quick', 'actmse', "
     "'actpercentile' or 'actentropy'"),
    ("finetune.py", ["--config", "configs/lenet5_mnistt.py", "--workdir", "W"],
     "error: config file 'configs/lenet5_mnistt.py' not found (--config)"),
    ("evaluate.py", ["--config", "configs/mobilenet_v1_0.75.py", "--workdir", "W", "--config.data.val_limt=3"],
     "error: config has no key 'data.val_limt' (did you mean 'data.val_limit'?)"),
    ("evaluate.py", ["--config", "configs/mobilenet_v1_0.75.py", "--workdir", "W", "--config.data.val_limit=x"],
     "error: config key 'data.val_limit' takes an int (default 0), got 'x'"),
    ("sweep.py", ["--config", "configs/workbench_lsq.py", "--workdir", "W", "--config.train.epoch=1"],
     "error: config has no key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("compare_tflite.py", ["--out", "W/results.json", "--config.data.val_dri=/images"],  # its default --config
     "error: config has no key 'data.val_dri' (did you mean 'data.val_dir'?)"),
])
def test_entry_points_report_a_bad_config_in_one_line(tmp_path, script, args, message):
  """Every entry point with a --config (fatq.cli.run): one line, exit status 2, nothing written."""
  args = [a.replace("W", str(tmp_path / "w"), 1) if a.startswith("W") else a for a in args]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == message
  assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")


def test_missing_key_message():
  cfg = _load_config("lenet5_mnist.py")
  assert cli.missing_key_message(cfg, "fat.epochs") is None
  assert cli.missing_key_message(cfg, "fat.per_device_batch_size") is None
  assert cli.missing_key_message(cfg, "fat.epoch") == "config has no key 'fat.epoch' (did you mean 'fat.epochs'?)"
  assert cli.missing_key_message(cfg, "seeed") == "config has no key 'seeed' (did you mean 'seed'?)"
  assert cli.missing_key_message(cfg, "calibration.xyz") == ("config has no key 'calibration.xyz' "
                                                             "(keys under 'calibration': calibration.batch_size)")
  assert "fat.epochs" in set(cli.flat_keys(cfg)) and "fat" in set(cli.flat_keys(cfg))


def _load_config(name, arg=None):
  return cli.load_config(os.path.join(ROOT, "configs", name) + (f":{arg}" if arg is not None else ""))


def test_load_config_gives_the_command_lines_config(tmp_path):
  """``cli.load_config('FILE:ARG')`` is the config ``--config=FILE:ARG`` gives (ml_collections' parser), for a config
  that loads another (the ImageNet FAT configs load their model config); a missing file is named."""
  from ml_collections.config_flags import config_flags
  for argument in ("lenet5_mnist.py:quick", "mobilenet_v1_0.75_fat.py:cpu", "mnasnet_1.0.py"):
    path = os.path.join(ROOT, "configs", argument)
    parsed = config_flags.ConfigFileFlagParser(name="config", lock_config=False).parse(path)
    assert cli.load_config(path).to_dict() == parsed.to_dict(), argument
  assert len(cli.load_config(os.path.join(ROOT, "configs", "mobilenet_v1_0.75_fat.py")).rows) == 9
  missing = str(tmp_path / "nope.py")
  with pytest.raises(FileNotFoundError, match=re.escape(f"config file '{missing}' not found")):
    cli.load_config(missing + ":quick")


def test_shipped_configs_pass_the_checks():
  configs = [_load_config("lenet5_mnist.py", variant)
             for variant in ("", "quick", "actmse", "actpercentile", "actentropy")]
  configs += [_load_config(f) for f in sorted(os.listdir(os.path.join(ROOT, "configs")))
              if f.endswith("_fat.py") and f != "imagenet_fat.py"]  # imagenet_fat.py: their shared layout
  configs += [_load_config("mobilenet_v1_0.75_fat.py", variant)
              for variant in ("cpu", "paper", "quick", "actmse", "actpercentile", "actentropy")]
  configs += [_load_config("mobilenet_cle_ptq.py", variant) for variant in ("mobilenet_v1_0.75", "mobilenet_v2_1.0")]
  assert len(configs) >= 13
  for cfg in configs:
    experiment.check_config(cfg)
    # every row's rules apply somewhere (traced, no weights: the point names do not depend on the image size)
    if cfg.model.name == "lenet5":
      model, sample = LeNet5(num_classes=cfg.model.num_classes), np.zeros((1, 28, 28, 1), np.float32)
    else:
      model, sample = models.build(cfg.model), np.zeros((1, 64, 64, 3), np.float32)
    experiment.check_rules(cfg, model, sample)


def test_activation_calibration_variants_pair_their_rows():
  """``:actmse``: each row twice, min/max then MSE activation ranges, and only the W8A4 pair fine-tunes (a model
  config's own per-row settings must not turn a PTQ row into a FAT row); ``:actpercentile`` and ``:actentropy``: the
  same rows once, with percentile or entropy ranges. LeNet-5's variants: its FAT rows below 8 bits."""
  files = [f for f in sorted(os.listdir(os.path.join(ROOT, "configs"))) if f.endswith("_fat.py")
           and f != "imagenet_fat.py"]
  assert len(files) >= 4
  for f in files:
    rows = [dict(r) for r in _load_config(f, "actmse").rows]
    assert [r.get("act_calibration", "minmax") for r in rows] == ["minmax", "mse"] * (len(rows) // 2), f
    assert all({**a, "act_calibration": "mse"} == b for a, b in zip(rows[::2], rows[1::2])), f
    assert [experiment.row_name(r) for r in rows if r.get("fat")] == [
        "W8A4-channel-symW-asymA-bc-tracked-learnbias", "W8A4-channel-symW-asymA-actmse-bc-tracked-learnbias"], f
    percentile = [dict(r) for r in _load_config(f, "actpercentile").rows]
    assert percentile == [dict(r, act_calibration="percentile") for r in rows[::2]], f
    assert [experiment.row_name(r) for r in percentile if r.get("fat")] == [
        "W8A4-channel-symW-asymA-actp99.99-bc-tracked-learnbias"], f
    assert [dict(r) for r in _load_config(f, "actentropy").rows] == [dict(r, act_calibration="entropy")
                                                                     for r in rows[::2]], f
  lenet = {v: [dict(r) for r in _load_config("lenet5_mnist.py", v).rows]
           for v in ("", "actmse", "actpercentile", "actentropy")}
  low = [r for r in lenet[""] if r.get("fat") and r["weight_bits"] < 8]
  assert len(low) == 8 and lenet["actmse"][::2] == low
  assert lenet["actpercentile"] == [dict(r, act_calibration="percentile", name=r["name"] + "-actp99.99") for r in low]
  assert lenet["actentropy"] == [dict(r, act_calibration="entropy", name=r["name"] + "-actentropy") for r in low]


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.rows.append(dict(weight_bits=33, act_bits=8)),
     r"config.rows\[13\] \(W33A8-tensor-sym\): QuantSpec.bits must be an integer in 2..16, got 33"),
    (lambda c: c.rows.append(dict(weight_bits=8, act_bits=1)), r"config.rows\[13\].*bits must be an integer in 2..16"),
    (lambda c: c.rows.append(dict(weight_bits=8, rules=[("conv1/.*", dict(bits=8, scale_bounds=(1.0, 0.5)))])),
     r"config.rows\[13\].*scale_bounds = \(1.0, 0.5\) is inverted: write it as \(low, high\)"),
    (lambda c: c.rows.append(dict(weight_bitz=8)), r"config.rows\[13\].*unknown quantization option\(s\) \['weight_bitz'\]"),
    (lambda c: c.rows.append(dict(weight_bits=4, act_bits=4, learn_biases=True)),
     r"config.rows\[13\] \(W4A4-tensor-sym-learnbias\): learn_biases: the bias offsets are learned by FAT "
     r"fine-tuning; set fat=True on this row"),
    (lambda c: c.rows.append(dict(weight_bits=4, weight_calibration="l2")),
     r"config.rows\[13\].*QuantSpec.calibration must be one of \('minmax', 'mse', 'percentile', 'entropy'\), got 'l2'"),
    (lambda c: c.rows.append(dict(weight_bits=4, act_calibration="l2")),
     r"config.rows\[13\].*QuantSpec.calibration must be one of \('minmax', 'mse', 'percentile', 'entropy'\), got 'l2'"),
    (lambda c: c.rows.append(dict(weight_bits=4, rules=[("fc2/output", dict(bits=4, kind="pot", calibration="mse"))])),
     r"config.rows\[13\].*calibration='mse' searches a uniform grid's range; kind='pot' has its own"),
    (lambda c: c.rows.append(dict(weight_bits=4, act_calibration="percentile", percentile=150)),
     r"config.rows\[13\] \(W4A8-tensor-sym-actp150\): QuantSpec.percentile is the share of values kept in range, "
     r"in % \(0 < p <= 100\), got 150"),
    (lambda c: c.rows.append(dict(weight_bits=4, rules=[("fc2/output", dict(bits=4, kind="lsq",
                                                                          calibration="percentile"))])),
     r"config.rows\[13\].*calibration='percentile' searches a uniform grid's range; kind='lsq' has its own"),
    (lambda c: c.rows.append(dict(weight_bits=4, fat=True, learn_biases=1)),
     r"config.rows\[13\].*learn_biases must be True, False or a pattern of layer names, got 1"),
    (lambda c: c.rows.append(dict(weight_bits=4, fat=True, learn_biases="fc[")),
     r"config.rows\[13\].*learn_biases 'fc\[' is not a regular expression of layer names"),
    (lambda c: c.rows.append(dict(weight_bits=8, fat=dict(lrr=1e-3))),
     r"config.rows\[13\] \(W8A8-tensor-sym-lrr0.001\): fat has no key 'lrr' \(keys of config.fat: batch_size, .* lr, "),
    (lambda c: c.rows.append(dict(weight_bits=8, fat=dict(lr=-1.0))),
     r"config.rows\[13\] \(W8A8-tensor-sym-lr-1\): fat.lr = -1.0: must be a positive learning rate"),
    (lambda c: c.rows.append(dict(weight_bits=8, fat="yes")),
     r"config.rows\[13\].*fat = 'yes': use True, or a non-empty dict of config.fat keys for this row alone"),
    (lambda c: setattr(c, "input_bits", 33), r"config.input_bits = 33: QuantSpec.bits must be an integer in 2..16"),
    (lambda c: c.fat.update(epochs=0), r"config.fat.epochs = 0: must be a positive integer"),
    (lambda c: c.fat.update(lr=-1e-3), r"config.fat.lr = -0.001: must be a positive learning rate"),
    (lambda c: c.fat.update(loss="l2"), r"config.fat.loss = 'l2': choose one of \['rmse', 'smoothed_l1'\]"),
    (lambda c: c.fat.update(schedule="cosine"), r"config.fat.schedule = 'cosine': choose one of"),
    (lambda c: c.fat.update(epochs=0, lr=0.0),  # every problem in one message, each with its fix
     r"config.fat.epochs = 0: must be a positive integer \(set it with --config.fat.epochs=...\); "
     r"config.fat.lr = 0.0: must be a positive learning rate \(set it with --config.fat.lr=...\)$"),
    (lambda c: c.rows.append(dict(weight_bits=8, fat=dict(lr=-1.0, batch_size=0))),
     r"config.rows\[13\] \(.*\): fat.batch_size = 0: must be a positive integer; "
     r"fat.lr = -1.0: must be a positive learning rate$"),
    (lambda c: c.data.update(num_holdout=0), r"config.data.num_holdout = 0: fine-tuning needs held-out images"),
    (lambda c: c.data.update(tfds_name="imagenet2012", unlabeled_dir="/my/images"),
     r"config.data.unlabeled_dir = '/my/images': images come from tfds 'imagenet2012' \(data.tfds_name\) or from "
     r"folders, not both"),
    (lambda c: c.calibration.update(batch_size=0), r"config.calibration.batch_size = 0: must be a positive integer"),
    (lambda c: c.rows.append(dict(c.rows[1], variant="reference")),  # the name does not say the variant
     r"config.rows\[1\] and config.rows\[13\] are both named 'W8A32-tensor-sym' \(.*\): give one of them name="),
    (lambda c: c.rows.append(dict(weight_bits=4, act_bits=4, fat=True, trainable=False, name="frozen")),
     r"config.rows\[13\] \(frozen\): fat=True with trainable=False: the row has nothing to fine-tune"),
    # ran with a negative or rising learning rate before (gradient ascent, or 10x the configured peak)
    (lambda c: c.fat.update(lr_min=-0.01), r"config.fat.lr_min = -0.01: the schedule's lowest learning rate: must be "
                                           r"in \[0, lr = 0.005\]"),
    (lambda c: c.fat.update(lr_min=0.05), r"config.fat.lr_min = 0.05: .*must be in \[0, lr = 0.005\]"),
    (lambda c: c.fat.update(seed=-1), r"config.fat.seed = -1: must be an integer >= 0"),
    (lambda c: setattr(c, "seed", -1), r"config.seed = -1: must be an integer >= 0"),
    (lambda c: c.fat.update(per_device_batch_size=-3),
     r"config.fat.per_device_batch_size = -3: must be an integer >= 0"),
    # slice bounds: -5 trained on all but 5 images before
    (lambda c: c.data.update(num_train=-5), r"config.data.num_train = -5: must be an integer >= 0"),
    (lambda c: c.data.update(num_train=50), r"config.data.num_train = 50: fewer than one training batch of 100"),
    (lambda c: c.data.update(num_calibration=0), r"config.data.num_calibration = 0: must be a positive integer"),
    # -3 scored 0 % on empty images, 0 blamed every image as unreadable
    (lambda c: c.data.update(image_size=-3), r"config.data.image_size = -3: must be a positive integer"),
    # the float LeNet-5 is trained first: a negative rate gave an 11 % teacher, 0 a ZeroDivisionError after loading
    (lambda c: c.model.update(float_lr=-1e-3), r"config.model.float_lr = -0.001: must be a positive learning rate"),
    (lambda c: c.model.update(float_batch_size=0), r"config.model.float_batch_size = 0: must be a positive integer"),
    (lambda c: c.model.update(float_epochs=0), r"config.model.float_epochs = 0: must be a positive integer"),
])
def test_out_of_range_config_values(edit, message):
  cfg = _load_config("lenet5_mnist.py")
  assert len(cfg.rows) == 13
  edit(cfg)
  with pytest.raises(ValueError, match=message):
    experiment.check_config(cfg)


def test_batch_that_does_not_split_over_the_devices_stops_before_any_work(monkeypatch):
  cfg = _load_config("lenet5_mnist.py")
  monkeypatch.setattr(experiment.jax, "device_count", lambda: 3)  # as with XLA_FLAGS=..._device_count=3
  with pytest.raises(experiment.InputError, match=r"config.fat.batch_size = 100: batch_size 100 is not a multiple "
                                                  r"of the 3 devices"):
    experiment.check_config(cfg)
  cfg.fat.per_device_batch_size = 30
  experiment.check_config(cfg)


def test_rules_are_checked_against_every_point_before_any_work():
  cfg = _load_config("lenet5_mnist.py")
  model, sample = LeNet5(num_classes=10), np.zeros((1, 28, 28, 1), np.float32)
  # points left in float were not counted, so these valid rows were refused as typos after their calibration
  cfg.rows = [dict(weight_bits=0, act_bits=8), dict(weight_bits=8, rules=[("fc3/kernel", None)])]
  cfg.input_bits = 0
  experiment.check_rules(cfg, model, sample)
  cfg.input_bits = 8
  for row, message in (
      (dict(weight_bits=8, rules=[("fc33/output", dict(bits=4))]), r"rule 'fc33/output' matches no tensor"),
      # the base rule (config.input_bits) comes first: a row's input rule silently gave the input 8 bits
      (dict(weight_bits=8, rules=[("input", dict(bits=4))]),
       r"rule 'input' never applies: every tensor it matches \(input\) is matched first by 'input' .*input_bits"),
      (dict(weight_bits=8, fat=True, learn_biases="fc9"), r"learn_biases 'fc9' matches no layer")):
    cfg.rows = [row]
    with pytest.raises(experiment.InputError, match=r"config.rows\[0\] \(.*\): .*" + message):
      experiment.check_rules(cfg, model, sample)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints.


def test_missing_and_damaged_float_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing: run experiments/finetune.py"):
    experiment.load_variables(tmp_path / "nothing")
  path = tmp_path / "ckpt"
  experiment.save_variables(str(path), {"params": {"w": np.arange(1000, dtype=np.float32)}})
  np.testing.assert_array_equal(experiment.load_variables(path)["params"]["w"], np.arange(1000))
  files = [p for p in path.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:  # cut short, as by a crash or a full disk while writing
    with open(p, "r+b") as f:
      f.truncate(3)
  with pytest.raises(ValueError, match="cannot read the checkpoint at .*ckpt .*incomplete.*Delete it"):
    experiment.load_variables(path)


def _params_like(model):
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), np.zeros((1, 28, 28, 1), np.float32))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def test_float_checkpoint_of_another_model(tmp_path):
  model = LeNet5(num_classes=10)
  sample = np.zeros((1, 28, 28, 1), np.float32)
  tasks.check_params_fit(model, _params_like(model), sample, "ok", "fix")  # the right one passes
  # a LeNet-5 with 5 classes, saved and loaded as tasks.prepare does
  experiment.save_variables(str(tmp_path / "c"), {"params": _params_like(LeNet5(num_classes=5))})
  params = experiment.load_variables(tmp_path / "c")["params"]
  with pytest.raises(ValueError, match=r"the checkpoint c does not fit LeNet5: fc3/bias has shape \(5,\), the "
                                       r"model needs \(10,\) \(another architecture.*\); retrain"):
    tasks.check_params_fit(model, params, sample, "c", "retrain")
  other = {"dense": {"kernel": np.zeros((784, 10), np.float32)}}
  with pytest.raises(ValueError, match="does not fit LeNet5: it has no conv1/bias; retrain"):
    tasks.check_params_fit(model, other, sample, "c", "retrain")
  extra = dict(_params_like(model), fc4={"kernel": np.zeros((10, 10), np.float32)})
  with pytest.raises(ValueError, match="tensors the model lacks, e.g. fc4/kernel"):
    tasks.check_params_fit(model, extra, sample, "c", "retrain")


def test_labels_the_model_cannot_predict_stop_before_any_work(tmp_path, imagenet_folders):
  """A label file of another numbering would score 0 % top-1 without a word: it stops, saying which labels and how
  many classes, as soon as the labeled images are read."""
  with pytest.raises(ValueError, match=r"labels run from 3 to 5000, but the model has 1000 classes: check the label "
                                       r"file \(0-based class indices, 0 to 999\)"):
    experiment.check_labels(np.array([5000, 3]), 0, 1000)
  with pytest.raises(ValueError, match=r"from 0 to 1000 \(\+1 for the model's background class 0\), but the model "
                                       r"has 1001 classes: .* 0 to 999\)"):
    experiment.check_labels(np.array([0, 1000]), 1, 1001)
  experiment.check_labels(np.array([0, 999]), 1, 1001)
  with pytest.raises(ValueError, match=r"labels run from -1 to 999 \(\+1 for the model's background class 0\)"):
    experiment.check_labels(np.array([-1, 999]), 1, 1001)  # was taken for the background class
  # through the ImageNet task, on three real validation images whose labels.txt counts from 1000
  val, unlabeled = imagenet_folders(3, 0)
  table = dict(line.split(",") for line in (val / "labels.txt").read_text().splitlines())
  shifted = {name: int(label) + 1000 for name, label in table.items()}
  (val / "labels.txt").write_text("".join(f"{name}, {label}\n" for name, label in shifted.items()))
  cfg = cli.load_config(os.path.join(ROOT, "configs", "mobilenet_v1_0.25_tflite.py"))
  cfg.data.update(val_dir=str(val), unlabeled_dir=str(tmp_path / "never_read"), cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=rf"labels run from {min(shifted.values())} to {max(shifted.values())} \(\+1 for "
                                       r"the model's background class 0\), but the model has 1001 classes"):
    tasks.prepare(cfg, str(tmp_path / "w"), progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Image files.


@pytest.fixture
def odd_images(tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (40, 60, 3), np.uint8)
  Image.fromarray(rgb).save(d / "a_ok.png")
  gray16 = rng.integers(0, 65536, (40, 60), np.uint16)
  Image.fromarray(gray16).save(d / "b_gray16.png")  # 16-bit grayscale PNG
  Image.fromarray((gray16 >> 8).astype(np.uint8)).save(d / "b_gray16_as_8bit.png")
  Image.fromarray(np.full((2, 3, 3), (10, 200, 30), np.uint8)).save(d / "c_tiny.png")  # smaller than any crop
  Image.fromarray(np.full((1, 1, 3), 77, np.uint8)).save(d / "c_1x1.png")
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, "JPEG", quality=90)
  (d / "x_truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  (d / "y_text.png").write_text("this is a text file with an image extension")
  (d / "z_empty.jpg").write_bytes(b"")
  return d


def test_unreadable_images_are_skipped_counted_and_named(odd_images, tmp_path):
  with pytest.warns(UserWarning) as caught:
    s = imagenet.load_folder(odd_images, "fat", 16, cache_dir=tmp_path / "c")
  bad = ["x_truncated.jpg", "y_text.png", "z_empty.jpg"]
  assert [os.path.basename(f) for f in s.skipped] == bad
  messages = " ".join(str(w.message) for w in caught)
  assert all(f"skipping unreadable image {odd_images / b}" in messages for b in bad)
  assert len(s.images) == len(s.files) == 5
  assert np.all(np.isfinite(s.images)) and s.images.min() >= -1 and s.images.max() <= 1
  # the cached result keeps the count
  with pytest.warns(UserWarning, match="x_truncated.jpg"):
    again = imagenet.load_folder(odd_images, "fat", 16, cache_dir=tmp_path / "c")
  assert again.skipped == s.skipped


def test_16_bit_and_tiny_images(odd_images):
  # 16-bit grayscale keeps its top 8 bits (Pillow's convert('RGB') would turn almost all of it white)
  np.testing.assert_array_equal(imagenet.load_rgb(odd_images / "b_gray16.png"),
                                imagenet.load_rgb(odd_images / "b_gray16_as_8bit.png"))
  for method in ("fat", "crop0875", "none"):
    tiny = imagenet.preprocess(imagenet.load_rgb(odd_images / "c_tiny.png"), method, 32)
    assert tiny.shape == (32, 32, 3)  # upsampled, not an empty crop
    np.testing.assert_allclose(tiny, np.broadcast_to(np.array([10, 200, 30]) / 127.5 - 1, (32, 32, 3)), atol=1e-6)
    one = imagenet.preprocess(imagenet.load_rgb(odd_images / "c_1x1.png"), method, 8)
    np.testing.assert_allclose(one, 77 / 127.5 - 1, atol=1e-6)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_damaged_image_cache_is_rebuilt(odd_images, tmp_path):
  with pytest.warns(UserWarning):
    first = imagenet.load_folder(odd_images, "fat", 16, cache_dir=tmp_path / "c")
  [npy] = (tmp_path / "c").glob("*.npy")
  arr = np.load(npy)
  arr[1, 0, 0, 0] = np.nan
  np.save(npy, arr)
  with pytest.warns(UserWarning, match="image cache .* is damaged"):
    second = imagenet.load_folder(odd_images, "fat", 16, cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(second.images, first.images)


# ---------------------------------------------------------------------------------------------------------------------
# NaN / Inf in weights or images, and the tiny experiment the remaining tests run.


def _tiny_experiment():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (160, 8)).astype(np.float32)
  model = TinyMLP()
  params = jax.tree.map(np.array, model.init(jax.random.key(0), x[:1])["params"])  # writable copies
  data = experiment.Data(train=x[:80], calibration=x[80:100], holdout=x[100:120], eval_images=x[120:],
                         eval_labels=rng.integers(0, 4, 40).astype(np.int32))
  cfg = ml_collections.ConfigDict(dict(
      seed=0, model=dict(name="tiny_mlp"), data=dict(name="random"), calibration=dict(batch_size=20), input_bits=8,
      fat=dict(epochs=2, batch_size=20, loss="rmse", schedule="constant", lr=1e-2, restart_period=4, eval_every=0,
               checkpoint_every=0, seed=0),
      rows=[dict(weight_bits=8, act_bits=8), dict(weight_bits=4, act_bits=4, per_channel=True, fat=True)],
      eval_batch_size=40))
  return cfg, model, params, data


def test_a_row_with_its_own_fine_tuning_settings(tmp_path):
  """``fat=dict(...)`` on a row: that row trains with those config.fat values, the others with config.fat; the row's
  name says so."""
  cfg, model, params, data = _tiny_experiment()
  cfg.rows = [cfg.rows[1], dict(cfg.rows[1], fat=dict(epochs=1, lr=5e-3))]
  experiment.check_config(cfg)
  results = experiment.run(cfg, model, params, data, str(tmp_path), progress=False, log=lambda *_: None)
  names = ["W4A4-channel-sym", "W4A4-channel-sym-epochs1-lr0.005"]
  assert [r["name"] for r in results["rows"] if r["method"] == "fat"] == names
  for name, steps, lr in zip(names, (8, 4), (1e-2, 5e-3)):  # 80 training images in batches of 20: 4 steps an epoch
    lines = [json.loads(line) for line in (tmp_path / "rows" / name / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == steps
    assert lines[-1]["lr"] == pytest.approx(lr)  # the constant schedule's rate
  assert cfg.fat.epochs == 2 and cfg.fat.lr == 1e-2  # the shared section is left as it was


def test_nan_or_inf_in_weights_or_images_stops_before_any_work(tmp_path):
  cfg, model, params, data = _tiny_experiment()
  params["fc2"]["kernel"][3, 1] = np.nan
  with pytest.raises(ValueError, match=r"float weights contain NaN/Inf: fc2/kernel \(shape \(16, 4\)\) has 1 "
                                       r"non-finite value.*load another"):
    experiment.run(cfg, model, params, data, str(tmp_path), progress=False)
  assert not (tmp_path / "results.json").exists()
  params["fc2"]["kernel"][3, 1] = 0.0
  data.holdout[5, 2] = np.inf
  data.holdout[7, 0] = -np.inf
  with pytest.raises(ValueError, match=r"holdout set: image 5 \(of 20\) contains NaN/Inf, 2 image\(s\) in all"):
    experiment.run(cfg, model, params, data, str(tmp_path), progress=False)
  assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The work directory and the disk.


def test_workdir_that_cannot_be_created(tmp_path):
  (tmp_path / "file").write_text("a file where the workdir's parent should be")
  out = _finetune(tmp_path / "file" / "run")
  assert out.returncode != 0
  assert "is not writable (Not a directory); choose another --workdir" in out.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_read_only_workdir(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    out = _finetune(ro)
  finally:
    ro.chmod(0o755)
  assert out.returncode != 0
  assert "is not writable (Permission denied); choose another --workdir" in out.stderr


def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_keeps_results_and_resume_continues(tmp_path, monkeypatch):
  cfg, model, params, data = _tiny_experiment()
  workdir = str(tmp_path)
  results_path = tmp_path / "results.json"
  logs = []

  # 1. the disk fills up while the fine-tuned row's checkpoint is written
  monkeypatch.setattr(experiment, "save_variables", _no_space)
  with pytest.raises(OSError, match="disk full while writing .*checkpoint: free space .* run the same command with "
                                    "--resume to continue") as e:
    experiment.run(cfg, model, params, data, workdir, progress=False, log=logs.append)
  assert e.value.errno == errno.ENOSPC
  rows = [(r["name"], r["method"]) for r in json.loads(results_path.read_text())["rows"]]
  assert rows == [("float", "float"), ("W8A8-tensor-sym", "ptq"), ("W4A4-channel-sym", "ptq")]
  before = results_path.read_text()

  # 2. on resume the training is not redone; now results.json itself cannot be written (half a file, then ENOSPC)
  monkeypatch.undo()

  def half_then_full(obj, f, **kw):
    f.write(json.dumps(obj, **kw)[:100])
    _no_space()

  # only fatq.experiment's json (atomic_write_json): orbax's own files are written as before
  monkeypatch.setattr(experiment, "json", types.SimpleNamespace(dump=half_then_full, load=json.load, dumps=json.dumps,
                                                                 loads=json.loads))
  logs.clear()
  with pytest.raises(OSError, match=r"disk full while writing .*results.json.*--resume"):
    experiment.run(cfg, model, params, data, workdir, resume=True, progress=False, log=logs.append)
  assert any("resumed at step 8 of 8" in m for m in logs), logs  # the fine-tuning was restored, not repeated
  assert results_path.read_text() == before  # the previous results.json is intact
  assert not list(tmp_path.glob("results.json*.tmp"))  # no partial temporary file left either

  # 3. space again: --resume finishes the row from the saved state
  monkeypatch.undo()
  logs.clear()
  results = experiment.run(cfg, model, params, data, workdir, resume=True, progress=False, log=logs.append)
  assert any("resumed at step 8 of 8" in m for m in logs), logs
  assert [(r["name"], r["method"]) for r in results["rows"]] == rows + [("W4A4-channel-sym", "fat")]
  assert json.loads(results_path.read_text())["rows"] == results["rows"]


def test_a_new_run_removes_earlier_row_files_and_resume_recomputes_a_lost_checkpoint(tmp_path):
  """A run without --resume in an earlier run's workdir: that run's row files (training state, checkpoint) would be
  resumed or exported as this run's, so they go. On --resume, a fine-tuned row whose checkpoint was deleted (as a
  damaged one's message says to) is fine-tuned again instead of being skipped."""
  cfg, model, params, data = _tiny_experiment()
  workdir, logs = str(tmp_path), []
  first = experiment.run(cfg, model, params, data, workdir, progress=False, log=logs.append)
  row = tmp_path / "rows" / "W4A4-channel-sym"
  earlier = experiment.load_variables(str(row / "checkpoint"))
  (row / "marker").write_text("left by the earlier run")
  cfg.fat.lr = 5e-3
  logs.clear()
  second = experiment.run(cfg, model, params, data, workdir, progress=False, log=logs.append)
  assert "removed what an earlier run left in" in " ".join(logs) and not (row / "marker").exists()
  assert not any("resumed at step" in m for m in logs), logs  # trained from the start, not from the earlier state
  assert second["rows"][-1]["holdout_loss"] != first["rows"][-1]["holdout_loss"]
  assert not np.array_equal(np.asarray(experiment.load_variables(str(row / "checkpoint"))["quant"]["fc1"]
                                       ["kernel_quant"]["scale"]), earlier["quant"]["fc1"]["kernel_quant"]["scale"])
  shutil.rmtree(row / "checkpoint")
  logs.clear()
  resumed = experiment.run(cfg, model, params, data, workdir, resume=True, progress=False, log=logs.append)
  assert any("fine-tuning again, as their checkpoints are missing: W4A4-channel-sym" in m for m in logs), logs
  assert (row / "checkpoint").is_dir()
  assert [(r["name"], r["method"]) for r in resumed["rows"]] == [(r["name"], r["method"]) for r in second["rows"]]
  assert resumed["rows"][-1]["top1"] == second["rows"][-1]["top1"]
  logs.clear()
  cfg.rows = cfg.rows[:1]  # PTQ alone: the message is what matters
  experiment.run(cfg, model, params, data, str(tmp_path / "typo"), resume=True, progress=False, log=logs.append)
  assert any("nothing to resume in" in m for m in logs), logs


def test_resume_on_another_device_count_with_per_device_batches_stops(tmp_path):
  """results.json records the device count: a run of ``per_device_batch_size`` 10 made on 2 devices (a global batch of
  20) resumed on this one device would train with 10; a fixed ``batch_size`` is the same global batch anywhere."""
  cfg, *_ = _tiny_experiment()
  cfg.rows = [cfg.rows[0], dict(cfg.rows[1], fat=dict(per_device_batch_size=5))]
  cfg.fat.per_device_batch_size = 10
  experiment.atomic_write_json(str(tmp_path / "results.json"), {"config": cfg.to_dict(), "devices": 2})
  with pytest.raises(ValueError, match=r"^--resume on 1 device\(s\) of a run made on 2 \(.*results.json\): with "
                                       r"per_device_batch_size the global batch would be 5 instead of 10, 10 instead "
                                       r"of 20, and its rows were trained with the earlier one\. Resume on 2 device"):
    experiment.check_resume(cfg, str(tmp_path))
  cfg.fat.per_device_batch_size, cfg.rows = 0, [cfg.rows[0], dict(cfg.rows[1], fat=True)]
  experiment.atomic_write_json(str(tmp_path / "results.json"), {"config": cfg.to_dict(), "devices": 2})
  experiment.check_resume(cfg, str(tmp_path))


def test_resume_with_another_config_stops_and_names_what_changed(tmp_path):
  cfg, model, params, data = _tiny_experiment()
  cfg.rows = [dict(cfg.rows[1], name="mine")]
  experiment.run(cfg, model, params, data, str(tmp_path), progress=False, log=lambda *_: None)

  def resume(change):
    changed = ml_collections.ConfigDict(cfg.to_dict())
    change(changed)
    return experiment.run(changed, model, params, data, str(tmp_path), resume=True, progress=False,
                          log=lambda *_: None)

  def lower_lr(c):
    c.fat.lr = 5e-3

  def other_bits(c):
    c.rows = [dict(c.rows[0], act_bits=8)]

  with pytest.raises(ValueError, match=r"--resume with another config than the one that wrote .*results.json: "
                                       r"fat.lr 0.01 -> 0.005\. .* or run the changed config in a new --workdir"):
    resume(lower_lr)
  with pytest.raises(ValueError, match=r"row mine \{.*'act_bits': 4.*\} -> \{.*'act_bits': 8.*\}"):
    resume(other_bits)
  with pytest.raises(ValueError, match="fat.lr"):  # the entry point checks before loading anything
    experiment.check_resume(ml_collections.ConfigDict(dict(cfg.to_dict(), fat=dict(cfg.fat, lr=5e-3))), str(tmp_path))

  def more_rows_bigger_batches(c):  # a new row, and a key that changes how, not what, is computed
    c.rows = [*c.rows, dict(weight_bits=8, act_bits=8)]
    c.eval_batch_size = 20

  results = resume(more_rows_bigger_batches)
  assert [(r["name"], r["method"]) for r in results["rows"]] == [
      ("float", "float"), ("mine", "ptq"), ("mine", "fat"), ("W8A8-tensor-sym", "ptq")]
