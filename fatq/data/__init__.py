"""Datasets: local IDX (MNIST, Fashion-MNIST) through tensorflow-datasets."""

from fatq.data.paths import data_root, resolve, tfds_dir

__all__ = ["data_root", "resolve", "tfds_dir"]
