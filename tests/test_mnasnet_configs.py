"""The MnasNet configs on a user's checkpoint. No MnasNet weights are available here, so each test first makes a
stand-in file of the same architecture (tests/scripts/standin_checkpoint.py: the hosted files' layout, random weights)
and then runs the configs on it as a user with mnasnet_1.0_224.tflite would: evaluate (default run), and load,
calibrate, fine-tune, evaluate, export and check the int8 file (slow: minutes each)."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from fatq import export
from fatq.data import imagenet
from fatq.models import loaders, mnasnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(ROOT, "tests", "scripts", "standin_checkpoint.py")
FINETUNE = os.path.join(ROOT, "experiments", "finetune.py")
ROW = "W8A8-channel-symW-asymA"  # the quick variant's row: TFLite's int8 scheme


def _standin(tmp_path, width: str, size: int, unlabeled=None) -> str:
  path = str(tmp_path / f"mnasnet_{width}_{size}.tflite")
  cmd = [sys.executable, STANDIN, os.path.join(ROOT, "configs", f"mnasnet_{width}.py"), path, f"--image_size={size}",
         "--images=8", f"--cache_dir={tmp_path / 'cache'}"] + ([f"--unlabeled_dir={unlabeled}"] if unlabeled else [])
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  return path


def _finetune(tmp_path, width: str, checkpoint: str, *overrides: str) -> tuple[dict, dict]:
  """``(results.json, export_report.json)`` of the quick variant with ``--export``."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, FINETUNE, "--config", os.path.join(ROOT, "configs", f"mnasnet_{width}_fat.py:quick"),
         "--workdir", str(workdir), f"--config.model.checkpoint={checkpoint}",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--noprogress", "--export", *overrides]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "mnasnet on imagenet" in run.stdout and "export report" in run.stdout  # the printed table and report
  results = json.loads((workdir / "results.json").read_text())
  return results, json.loads((workdir / "rows" / ROW / "tflite" / "export_report.json").read_text())


def _check_float(checkpoint: str, width: float, size: int):
  """The model a config loads from the user's file: every layer's params, and the interpreter's logits."""
  model = mnasnet.MnasNet(width, 1001)
  params, load = loaders.load_checkpoint(model, checkpoint, image_size=size)
  assert load.num_tensors == 2 * len(loaders.ordered_layers(model, size))
  image = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
  lite = export.TFLiteModel(checkpoint)(image)
  got = np.asarray(jax.jit(model.apply)({"params": params}, image))
  assert np.max(np.abs(got - lite)) <= 1e-5 * np.max(np.abs(lite))  # float32 rounding through 53 layers


def _check(results: dict, report: dict, checkpoint: str, width: float, size: int, images: int):
  assert results["model"] == "mnasnet"
  rows = {(r["name"], r["method"]): r for r in results["rows"]}
  assert list(rows) == [("float", "float"), (ROW, "ptq"), (ROW, "fat")]
  fat = rows[(ROW, "fat")]
  assert fat["holdout_loss"]["best"] < fat["holdout_loss"]["initial"]  # fine-tuning lowered the distillation loss
  _check_float(checkpoint, width, size)
  # the exported int8 file: every scale read back, and the interpreter computes the JAX model's integer logits
  assert report["readback"]["matched"] == report["readback"]["tensors"] > 100
  assert report["eval"]["logits_equal"] == 1.0 and report["eval"]["images"] == images
  assert report["integer"]["vs_interpreter"]["logits_equal"] == 1.0
  assert report["size_bytes"]["tflite"] < report["size_bytes"]["float_tflite"] / 3


def test_mnasnet_config_evaluates_a_users_checkpoint(tmp_path, imagenet_folders):
  """experiments/evaluate.py with configs/mnasnet_1.0.py on a full-width MnasNet 1.0 file (64 px, 16 images): the
  config loads the file, and its top-1 is the interpreter's on the same images. Fine-tuning it: the slow tests."""
  val, unlabeled = imagenet_folders(16, 4)
  checkpoint = _standin(tmp_path, "1.0", 64, unlabeled)
  workdir = tmp_path / "eval"
  overrides = [f"--config.model.checkpoint={checkpoint}", "--config.model.image_size=64",
               "--config.data.image_size=64", f"--config.data.val_dir={val}", f"--config.data.cache_dir={tmp_path}"]
  run = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"), "--config",
                        os.path.join(ROOT, "configs", "mnasnet_1.0.py"), "--workdir", str(workdir), *overrides],
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["model"] == "mnasnet" and results["num_images"] == 16
  assert results["load_report"]["num_tensors"] == 106  # 52 conv layers and the logits, kernel and bias each
  d = ml_collections.ConfigDict(imagenet.data_config("fat", 64, val_dir=str(val), cache_dir=str(tmp_path)))
  images = imagenet.evaluation_set(d, label_offset=1, progress=False)
  interpreter = export.TFLiteModel(checkpoint)(images.images)
  assert results["rows"][0]["top1"] == np.mean(interpreter.argmax(1) == images.labels)
  _check_float(checkpoint, 1.0, 64)


@pytest.mark.slow
def test_mnasnet_config_end_to_end_on_a_users_checkpoint(tmp_path, imagenet_folders):
  """configs/mnasnet_1.0_fat.py:quick, full width, at 64 px on a few real images."""
  val, unlabeled = imagenet_folders(16, 40)
  checkpoint = _standin(tmp_path, "1.0", 64, unlabeled)
  results, report = _finetune(
      tmp_path, "1.0", checkpoint, "--config.model.image_size=64", "--config.data.image_size=64",
      f"--config.data.val_dir={val}", f"--config.data.unlabeled_dir={unlabeled}", "--config.data.num_calibration=8",
      "--config.data.num_holdout=8", "--config.calibration.batch_size=8", "--config.fat.batch_size=8",
      "--config.eval_batch_size=16", "--config.fat.eval_every=2")
  _check(results, report, checkpoint, 1.0, 64, 16)


@pytest.mark.slow
@pytest.mark.parametrize("width", ["1.0", "1.3"])
def test_mnasnet_config_end_to_end_full_size(tmp_path, width):
  """The quick variant as shipped (224 px, the embedded images), the export checked on 200 validation images."""
  checkpoint = _standin(tmp_path, width, 224)
  results, report = _finetune(tmp_path, width, checkpoint, "--config.data.val_limit=200")
  _check(results, report, checkpoint, float(width), 224, 200)
