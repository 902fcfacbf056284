"""MNIST-format (IDX) datasets through tensorflow-datasets, read from local files only (never downloaded).

``IdxImages`` is a tfds builder with one config per dataset; its ``manual_dir`` holds the four gzipped IDX files
(``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-...``). Preparation happens once and is
cached in the tfds data dir.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fatq.data.paths import resolve, tfds_dir

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Parse a (gzipped) IDX file: magic ``0 0 dtype ndim``, big-endian dims, then the data (uint8 here)."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"cannot read IDX file {path}: {e} (is it a complete, gzipped MNIST-format file?)") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
  ndim = raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(f"{path} is truncated: its header of {ndim} dimensions is cut short ({len(raw)} bytes)")
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    problem = "truncated" if data.size < int(np.prod(dims)) else "longer than its header says"
    raise ValueError(f"{path} is {problem}: header says {dims} = {int(np.prod(dims))} values, found {data.size}")
  return data.reshape(dims)


class IdxImages(tfds.core.GeneratorBasedBuilder):
  """28x28 grayscale images with 10 classes from local IDX files."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="mnist"), tfds.core.BuilderConfig(name="fashion_mnist")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the four gzipped IDX files in manual_dir (see fatq.data.idx.FILES)."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(Path(dl_manager.manual_dir), *names) for split, names in FILES.items()}

  def _generate_examples(self, directory: Path, images_file: str, labels_file: str):
    images, labels = read_idx(directory / images_file), read_idx(directory / labels_file)
    if len(images) != len(labels):
      raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels")
    # checked here, in one line: tfds's own encoding error prints the whole offending array
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise ValueError(f"{directory / images_file} holds an array of shape {images.shape}, not 28x28 images (is it a "
                       f"labels file? {labels_file} is the labels)")
    if labels.ndim != 1:
      raise ValueError(f"{directory / labels_file} holds an array of shape {labels.shape}, not one label per image "
                       f"(is it an images file? {images_file} is the images)")
    if labels.size and labels.max() > 9:
      raise ValueError(f"{directory / labels_file} holds labels up to {int(labels.max())}, not classes 0-9")
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image[..., None], "label": int(label)}


def sources(name: str, directory: str | os.PathLike | None = None) -> dict[str, str]:
  """``{'unlabeled': ..., 'evaluation': ...}`` for results files: the training split (its labels unread) is the
  unlabeled pool, the test split the evaluation set, in the folder :func:`load` reads."""
  directory = resolve(directory, name)
  return {"unlabeled": f"{directory} train (labels not read)", "evaluation": f"{directory} test"}


def load(name: str, split: str, directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(images float32 in [0, 1] of shape (N, 28, 28, 1), labels int32)`` of one split.

  ``directory`` defaults to ``<data root>/<name>``; prepared records are cached under ``$FATQ_TFDS_DIR``, keyed by
  the files' contents.
  """
  directory = resolve(directory, name)
  missing = [f for f in FILES[split] if not (directory / f).exists()]
  if missing:
    raise FileNotFoundError(f"{name} {split} split: {missing} not found in {directory}. Put the gzipped IDX files "
                            f"there, or point data.dir / $FATQ_DATA at the folder that holds them")
  # prepared once per content of the files: records prepared from other files (another data.dir, files replaced)
  # sit in another folder and are never read for these
  builder = IdxImages(config=name, data_dir=str(tfds_dir() / "fatq_idx" / _fingerprint(directory)))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(directory)))
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return (data["image"].astype(np.float32) / 255.0), data["label"].astype(np.int32)


def _fingerprint(directory: Path) -> str:
  """SHA-1 of the IDX files in ``directory`` (tens of MB at most: a fraction of a second)."""
  digest = hashlib.sha1()
  for name in sorted(n for names in FILES.values() for n in names):
    if (directory / name).exists():
      digest.update(name.encode())
      digest.update(hashlib.sha1((directory / name).read_bytes()).digest())
  return digest.hexdigest()[:16]
