"""Fixtures shared by test modules: a slice of real MNIST and a LeNet-5 trained on it for one epoch."""

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
