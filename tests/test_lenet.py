"""LeNet-5 end to end on a slice of the real MNIST files: float training, PTQ, FAT, results.json."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fatq import cli, experiment, tasks, training
from fatq.data import data_root, idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_mnist = pytest.mark.skipif(not (data_root() / "mnist" / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason="../shared/data/mnist not present")


def test_read_idx_rejects_corrupt_and_truncated(tmp_path):
  bad = tmp_path / "x.gz"
  bad.write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="cannot read IDX file"):
    idx.read_idx(bad)
  raw = tmp_path / "y.idx"
  raw.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(5))
  with pytest.raises(ValueError, match="truncated"):
    idx.read_idx(raw)
  raw.write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big"))  # three dimensions, one given
  with pytest.raises(ValueError, match=r"truncated: its header of 3 dimensions is cut short \(8 bytes\)"):
    idx.read_idx(raw)
  raw.write_bytes(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes(5))
  with pytest.raises(ValueError, match=r"longer than its header says: header says \(2,\) = 2 values, found 5"):
    idx.read_idx(raw)


def test_prepared_records_follow_the_files_read(tmp_path, monkeypatch):
  """tfds prepares the IDX files once; another folder, or the same folder's files replaced, must not be served the
  records prepared from the first (they were, keyed by the dataset's name alone)."""
  import gzip

  monkeypatch.setenv("FATQ_TFDS_DIR", str(tmp_path / "tfds"))

  def write(folder, value):
    folder.mkdir(exist_ok=True)
    for (images, labels), n in zip(idx.FILES.values(), (6, 3)):
      with gzip.open(folder / images, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in (n, 28, 28)) + bytes([value]) * n * 784)
      with gzip.open(folder / labels, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes([value % 10]) * n)

  write(tmp_path / "a", 10)
  write(tmp_path / "b", 200)
  for folder, value in (("a", 10), ("b", 200), ("a", 10)):
    x, y = idx.load("mnist", "test", tmp_path / folder)
    assert x.shape == (3, 28, 28, 1) and np.all(x == np.float32(value / 255)) and np.all(y == value % 10)
  write(tmp_path / "a", 30)
  x, y = idx.load("mnist", "test", tmp_path / "a")
  assert np.all(x == np.float32(30 / 255)) and np.all(y == 0)


def test_idx_files_that_are_not_mnist_are_named_in_one_line(tmp_path, monkeypatch):
  """Labels past 9, images that are not 28x28, or the two files swapped: one line naming the file (tfds's own error
  printed the whole array)."""
  import gzip

  monkeypatch.setenv("FATQ_TFDS_DIR", str(tmp_path / "tfds"))

  def write(folder, label=3, side=28):
    folder.mkdir()
    for images, labels in idx.FILES.values():
      with gzip.open(folder / images, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, side, side)) + bytes(2 * side * side))
      with gzip.open(folder / labels, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([label, 1]))

  write(tmp_path / "labels12", label=12)
  with pytest.raises(ValueError, match=r"labels-idx1-ubyte.gz holds labels up to 12, not classes 0-9"):
    idx.load("mnist", "test", tmp_path / "labels12")
  write(tmp_path / "side32", side=32)
  with pytest.raises(ValueError, match=r"images-idx3-ubyte.gz holds an array of shape \(2, 32, 32\), not 28x28 images"):
    idx.load("mnist", "test", tmp_path / "side32")
  write(tmp_path / "swapped")
  for images, labels in idx.FILES.values():
    (tmp_path / "swapped" / images).rename(tmp_path / "swapped" / "x")
    (tmp_path / "swapped" / labels).rename(tmp_path / "swapped" / images)
    (tmp_path / "swapped" / "x").rename(tmp_path / "swapped" / labels)
  with pytest.raises(ValueError, match=r"images-idx3-ubyte.gz holds an array of shape \(2,\), not 28x28 images \(is "
                                       r"it a labels file\? .*labels-idx1-ubyte.gz is the labels\)"):
    idx.load("mnist", "test", tmp_path / "swapped")


def test_missing_data_folder_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found in .*FATQ_DATA"):
    idx.load("mnist", "test", tmp_path)


@needs_mnist
def test_real_mnist_matches_the_idx_files():
  images, labels = idx.load("mnist", "test")
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.float32
  raw = idx.read_idx(data_root() / "mnist" / "t10k-images-idx3-ubyte.gz")
  raw_labels = idx.read_idx(data_root() / "mnist" / "t10k-labels-idx1-ubyte.gz")
  # tfds stores examples in its own order: the same (image, label) pairs, as multisets, each image as its bytes
  codes = np.rint(images.reshape(10000, -1) * 255).astype(np.uint8)
  np.testing.assert_allclose(images.reshape(10000, -1), codes / 255.0, rtol=0, atol=1e-7)  # x / 255, no other scaling
  loaded = sorted(zip((c.tobytes() for c in codes), labels.tolist()))
  assert loaded == sorted(zip((r.tobytes() for r in raw.reshape(10000, -1).astype(np.uint8)), raw_labels.tolist()))


@needs_mnist
def test_finetune_entry_point_on_real_mnist(tmp_path):
  """The real command on a small config: float LeNet, W8A8 PTQ close to float, FAT W3A3 better than PTQ W3A3."""
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "finetune.py"),
         "--config", os.path.join(ROOT, "configs", "lenet5_mnist.py:quick"), "--workdir", str(tmp_path),
         "--noprogress"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.load(open(tmp_path / "results.json"))
  assert res["model"] == "lenet5" and res["dataset"] == "mnist"
  mnist = data_root() / "mnist"
  assert res["sources"] == {"unlabeled": f"{mnist} train (labels not read)", "evaluation": f"{mnist} test"}
  rows = {(r["name"], r["method"]): r for r in res["rows"]}
  for r in res["rows"]:
    assert set(r) >= {"method", "weight_bits", "act_bits", "granularity", "symmetric", "top1", "agreement",
                      "vs_float"}
    v = r["vs_float"]  # the 10 000 test images: top-1's difference from float is (gained - lost) / 10 000
    assert np.isclose(r["top1"] - res["rows"][0]["top1"], (v["gained"] - v["lost"]) / 10000, atol=1e-9)
  fl = rows[("float", "float")]["top1"]
  assert fl > 0.95  # one epoch of LeNet-5
  w8 = rows[("W8A8-tensor-symW-asymA", "ptq")]
  assert abs(w8["top1"] - fl) <= 0.002 and w8["agreement"] >= 0.995
  ptq3, fat3 = rows[("W3A3-channel-symW-asymA", "ptq")], rows[("W3A3-channel-symW-asymA", "fat")]
  assert fat3["top1"] > ptq3["top1"]
  assert fat3["holdout_loss"]["best"] < fat3["holdout_loss"]["initial"]
  assert os.path.isdir(tmp_path / "rows" / "W3A3-channel-symW-asymA" / "checkpoint")
  assert "float" in out.stdout and "W3A3-channel-symW-asymA" in out.stdout  # the printed table

  # --resume skips finished rows and keeps their numbers
  out2 = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900)
  assert out2.returncode == 0, out2.stderr[-3000:]
  assert "resuming: 4 row(s)" in out2.stdout
  res2 = json.load(open(tmp_path / "results.json"))
  assert [r["top1"] for r in res2["rows"]] == [r["top1"] for r in res["rows"]]


def test_config_typo_is_reported(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "finetune.py"),
         "--config", os.path.join(ROOT, "configs", "lenet5_mnist.py"), "--workdir", str(tmp_path),
         "--config.fat.epochz=3"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "epochz" in out.stderr and "epochs" in out.stderr


def test_scores():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
  s = experiment.scores(logits, np.array([1, 1]), np.array([[0, 1, 0], [0, 1, 0]]))
  assert s["top1"] == 0.5 and s["agreement"] == 0.5
  assert s["vs_float"] == {"gained": 0, "lost": 1, "stderr": np.sqrt((1 / 2 - 1 / 4) / 2)}
  # 10 images, labels 0..9; the float model is right on the first 6, the quantized one on images 2..8:
  # gained {6, 7, 8}, lost {0, 1}, the difference in top-1 (3 - 2) / 10.
  labels = np.arange(10)
  float_logits, q_logits = np.eye(10)[[0, 1, 2, 3, 4, 5, 0, 0, 0, 0]], np.eye(10)[[9, 9, 2, 3, 4, 5, 6, 7, 8, 0]]
  s = experiment.scores(q_logits, labels, float_logits)
  f = experiment.scores(float_logits, labels, float_logits)
  assert (s["vs_float"]["gained"], s["vs_float"]["lost"]) == (3, 2)
  assert np.isclose(s["top1"] - f["top1"], (3 - 2) / 10)
  d = np.array([-1, -1, 0, 0, 0, 0, 1, 1, 1, 0])  # per image: quantized right minus float right
  assert np.isclose(s["vs_float"]["stderr"], d.std() / np.sqrt(10))  # the paired difference's standard error
  assert f["vs_float"] == {"gained": 0, "lost": 0, "stderr": 0.0}
  assert "+3 -2" in experiment.format_row(dict(s, name="r", method="fat", weight_bits=4, act_bits=4,
                                               granularity="tensor", symmetric=True, seconds=1.0))


@needs_mnist
def test_float_model_cached_in_the_workdir_is_trained_again_for_other_settings(tmp_path, monkeypatch, capsys):
  trained = []

  def fake_train(model, images, labels, *, epochs, **kwargs):  # records the settings instead of training
    trained.append(epochs)
    return model.init(jax.random.key(epochs), images[:1])["params"]

  monkeypatch.setattr(training, "train_classifier", fake_train)
  cfg = cli.load_config(os.path.join(ROOT, "configs", "lenet5_mnist.py:quick"))

  def prepare():
    return tasks.prepare(cfg, str(tmp_path), progress=False)[1]

  first, again = prepare(), prepare()
  assert trained == [1]  # the second run loads what the first trained
  jax.tree.map(np.testing.assert_array_equal, first, again)
  cfg.model.float_epochs = 2
  prepare()
  assert trained == [1, 2]
  assert "was trained with other settings (epochs 1 -> 2); training it again" in capsys.readouterr().out
  assert json.loads((tmp_path / "float_checkpoint.json").read_text())["epochs"] == 2
  cfg.seed = 1
  prepare()
  assert trained == [1, 2, 2] and "(seed 0 -> 1)" in capsys.readouterr().out
  # a workdir of an older fatq, whose checkpoint has no settings beside it: reused as it is
  (tmp_path / "float_checkpoint.json").unlink()
  cfg.model.float_epochs = 3
  prepare()
  assert trained == [1, 2, 2]
