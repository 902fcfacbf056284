"""Fixtures shared by test modules: a slice of real MNIST and a LeNet-5 trained on it for one epoch; small folders
of the real ImageNet images."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mnist():
  """8000 training and 1000 test images of ../shared/data/mnist: ``(xtr, ytr, xte, yte)``."""
  from fatq.data import idx
  xtr, ytr = idx.load("mnist", "train")
  xte, yte = idx.load("mnist", "test")
  return xtr[:8000], ytr[:8000], xte[:1000], yte[:1000]


@pytest.fixture(scope="session")
def lenet_params(mnist):
  """Float LeNet-5 params after one epoch on ``mnist``."""
  from fatq.models import LeNet5
  from fatq.training import train_classifier
  xtr, ytr, _, _ = mnist
  return train_classifier(LeNet5(), xtr, ytr, epochs=1, batch_size=64, progress=False, log=lambda *_: None)


@pytest.fixture
def imagenet_folders(tmp_path):
  """``make(n_val, n_unlabeled) -> (val, unlabeled)``: a labeled folder (the first ``n_val`` validation images with
  their ``labels.txt`` lines) and an unlabeled one (the first ``n_unlabeled`` images), under ``tmp_path``."""
  import os
  import shutil

  from fatq.data.paths import data_root

  def make(n_val, n_unlabeled):
    src = data_root() / "imagenet"
    val, unlabeled = tmp_path / "val", tmp_path / "unlabeled"
    val.mkdir()
    unlabeled.mkdir()
    lines = [line for line in (src / "val" / "labels.txt").read_text().splitlines() if not line.startswith("#")]
    for line in lines[:n_val]:
      shutil.copy(src / "val" / line.split(",")[0], val)
    (val / "labels.txt").write_text("\n".join(lines[:n_val]) + "\n")
    for f in sorted(os.listdir(src / "unlabeled"))[:n_unlabeled]:
      shutil.copy(src / "unlabeled" / f, unlabeled)
    return val, unlabeled

  return make
