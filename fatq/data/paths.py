"""Where data lives. The embedded default is ``../shared/data`` beside the repository; ``FATQ_DATA`` overrides it."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
  """``$FATQ_DATA`` if set, else ``<repo>/../shared/data``."""
  return Path(os.environ.get("FATQ_DATA", REPO_ROOT.parent / "shared" / "data"))


def resolve(path: str | os.PathLike | None, default: str) -> Path:
  """A user path as given, or ``default`` under :func:`data_root`."""
  return Path(path).expanduser() if path else data_root() / default


def tfds_dir() -> Path:
  """Where prepared tfds datasets are cached: ``$FATQ_TFDS_DIR`` or tfds' own default."""
  return Path(os.environ.get("FATQ_TFDS_DIR", Path.home() / "tensorflow_datasets"))
