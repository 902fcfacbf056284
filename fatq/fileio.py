"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
from typing import IO, Callable


def write_atomically(path: str | os.PathLike, write: Callable[[IO], object], mode: str = "w") -> None:
  """``write(file)`` into a temporary file beside ``path`` (opened with ``mode``, ``'w'`` or ``'wb'``), then rename it
  to ``path``: a crash, a full disk or another process writing the same file never leaves a partial file there, and
  on failure the previous file stays as it was."""
  tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"  # this process's own: two writers never share one
  try:
    with open(tmp, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)  # a partial temporary file: nothing worth keeping
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """``path`` holding ``data``, written whole or not at all (:func:`write_atomically`)."""
  write_atomically(path, lambda f: f.write(data), "wb")


def write_text(path: str | os.PathLike, text: str) -> None:
  """``path`` holding ``text``, written whole or not at all (:func:`write_atomically`)."""
  write_atomically(path, lambda f: f.write(text))
