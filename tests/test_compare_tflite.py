"""experiments/compare_tflite.py end to end on a small model and a dozen real images: TFLite's own post-training
quantization and fatq's export of the same float model, read from the folders the config's data section names."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from fatq import models
from fatq.data import imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_tflite_on_user_folders(tmp_path, imagenet_folders):
  val, unlabeled = imagenet_folders(12, 110)
  out = tmp_path / "out" / "results.json"
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "compare_tflite.py"), "--v1_workdir=",
         f"--config={os.path.join(ROOT, 'configs', 'mobilenet_v1_0.25_tflite.py')}",
         f"--config.data.val_dir={val}", f"--config.data.unlabeled_dir={unlabeled}",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--calib=8", "--threads=1", "--noqat", f"--out={out}"]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  res = json.loads(out.read_text())
  name = "mobilenet_v1_0.25_tflite"
  assert res["images"] == {name: dict(evaluation=str(val), unlabeled=str(unlabeled), num_evaluation=12,
                                      num_calibration=8)}
  rows = {r["model"]: r for r in res["rows"]}
  assert list(rows) == [f"{name} float32", f"{name} TFLite PTQ int8", f"{name} fatq int8"]
  fl, ptq, fatq = rows.values()
  assert fl["input"] == "float32" and ptq["input"] == fatq["input"] == "int8"
  assert ptq["calibration_images"] == 8
  # both int8 files compute the float model's classes (a broken conversion agrees on almost none of 1001; measured 9 of
  # the 12 images for each: 8 calibration images, v1 0.25 is fragile at 8 bits)
  assert ptq["agreement_with_float"] >= 0.5 and fatq["agreement_with_float"] >= 0.5, (ptq, fatq)

  # the float row is the JAX model on the same images: same top-1
  cfg = ml_collections.ConfigDict(res["args"]["config"])
  model, params, _ = models.load(cfg.model)
  images = imagenet.evaluation_set(cfg.data, label_offset=1, progress=False)
  logits = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x))(images.images))
  assert fl["top1"] == np.mean(logits.argmax(1) == images.labels)

  # fatq's int8 file: every tensor read back as exported, the interpreter agrees with the JAX fake-quant model
  matched, tensors = map(int, fatq["readback"].split("/"))
  assert matched == tensors > 50
  assert fatq["agreement_with_jax"] >= 11 / 12 and abs(fatq["top1"] - fatq["jax_fake_quant_top1"]) <= 1 / 12
  # int8 weights: both quantized files are under a third of the float one
  assert max(ptq["size_bytes"], fatq["size_bytes"]) < fl["size_bytes"] / 3
  assert "1 thr ms" in run.stdout and f"{name} fatq int8" in run.stdout


def test_compare_tflite_argument_mistakes_are_one_line(tmp_path):
  script = os.path.join(ROOT, "experiments", "compare_tflite.py")
  other = tmp_path / "other"  # another tool's results.json
  other.mkdir()
  (other / "results.json").write_text(json.dumps(dict(rows=[])))
  two = tmp_path / "two"  # a finetune.py run with two fine-tuned rows
  for row in ("a", "b"):
    (two / "rows" / row / "checkpoint").mkdir(parents=True)
  (two / "results.json").write_text(json.dumps(dict(config=dict(rows=[dict(name="a"), dict(name="b")]))))
  for args, message in (
      (["--threads", "1", "2"], "error: unexpected arguments ['2']; repeat a flag for several values "
                                "(--threads=1 --threads=2)"),
      ([f"--v1_workdir={tmp_path / 'none'}"], f"error: --v1_workdir={tmp_path / 'none'}: no finetune.py run there"),
      (["--calib=0"], "error: --calib=0: must be >= 1"),
      ([f"--v1_workdir={other}"], f"error: {other / 'results.json'} holds no finetune.py config (with rows): {other} "
                                  "is not an experiments/finetune.py workdir"),
      ([f"--v1_workdir={two}"], f"error: --v1_workdir={two}: choose a row among the fine-tuned rows ['a', 'b']; pick "
                                "one with --v1_row"),
      ([f"--v1_workdir={two}", "--v1_row=c"], f"error: --v1_workdir={two}: choose a row among the fine-tuned rows "
                                              "['a', 'b'] (got 'c')")):
    run = subprocess.run([sys.executable, script, f"--out={tmp_path / 'out' / 'results.json'}", *args],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(message), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
