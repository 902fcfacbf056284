"""ImageNet-style image folders as numpy arrays: decoding, preprocessing, labels and an on-disk cache.

* Recursive ``*.jpg / *.jpeg / *.png`` (any case); grayscale (8 or 16 bit), CMYK, palette and RGBA images become
  RGB; a file that cannot be decoded (corrupt, truncated, not an image) is skipped with a warning and counted (never
  a crash). Images smaller than the crop are upsampled.
* Labeled folders use a label file of ``file, label`` lines (``#`` comments), 0-based 1000-class indices in
  sorted-synset order; ``label_offset=1`` maps them onto 1001-class TF-slim/TFLite models (class 0 = background).
* Preprocessing (``x / 127.5 - 1`` after a bilinear resize without antialiasing, half-pixel centres as
  ``tf.image.resize``):
    - ``'fat'``: central square crop of 0.85 of the short side (the FAT reference code);
    - ``'crop0875'``: central crop of 0.875 of each side (TF-slim's ``central_crop(0.875)`` evaluation);
    - ``'none'``: resize the whole image.
* Decoded and resized arrays are cached as ``.npy`` (float16; returned rounded to float16 also when computed) per (folder contents, preprocessing, size, limit)
  in ``cache_dir`` so that they are not recomputed every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

EXTENSIONS = (".jpg", ".jpeg", ".png")
PREPROCESSING = {"fat": 0.85, "crop0875": 0.875, "none": 1.0}


@dataclasses.dataclass
class ImageSet:
  images: np.ndarray  # (N, size, size, 3) float32 in [-1, 1]
  labels: np.ndarray | None  # (N,) int32, already offset
  files: list[str]
  skipped: list[str]  # files that could not be decoded


def list_images(folder: str | os.PathLike) -> list[Path]:
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"image folder {folder} does not exist")
  return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def read_labels(path: str | os.PathLike) -> dict[str, int]:
  """``{file name: label}`` from a ``file, label`` text file (comments start with ``#``)."""
  labels = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      try:
        name, label = line.rsplit(",", 1)
        labels[name.strip()] = int(label)
      except ValueError:
        raise ValueError(f"{path}:{n}: expected 'file, label', got {line!r}") from None
  return labels


def load_rgb(path) -> np.ndarray:
  """Decode an image file to ``uint8 (H, W, 3)`` RGB (grayscale, CMYK, palette, RGBA converted)."""
  from PIL import Image

  with Image.open(path) as im:
    im.load()
    if im.mode == "I" or im.mode.startswith("I;16"):
      # 16-bit grayscale PNG (Pillow's "I;16" / "I"): convert("RGB") would clip every value above 255 to white;
      # keep the top 8 bits, as Pillow itself does for 16-bit RGB PNGs.
      gray = np.clip(np.asarray(im).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
      return np.repeat(gray[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "P", "PA"):
      im = im.convert("RGBA")
      bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
      im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("RGB"), np.uint8)


def resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to ``(size, size)`` with half-pixel centres, no antialiasing (``tf.image.resize`` bilinear)."""
  img = img.astype(np.float32)
  h, w = img.shape[:2]

  def coords(n_in, n_out):
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    x0 = np.floor(x).astype(np.int64)
    x1 = np.minimum(x0 + 1, n_in - 1)
    return x0, x1, (x - x0).astype(np.float32)

  y0, y1, wy = coords(h, size)
  x0, x1, wx = coords(w, size)
  top = img[y0][:, x0] * (1 - wx)[None, :, None] + img[y0][:, x1] * wx[None, :, None]
  bot = img[y1][:, x0] * (1 - wx)[None, :, None] + img[y1][:, x1] * wx[None, :, None]
  return top * (1 - wy)[:, None, None] + bot * wy[:, None, None]


def preprocess(img: np.ndarray, method: str = "fat", size: int = 224) -> np.ndarray:
  """Crop, resize and scale one ``uint8 (H, W, 3)`` image to ``float32 (size, size, 3)`` in [-1, 1]."""
  if method not in PREPROCESSING:
    raise ValueError(f"unknown preprocessing {method!r}; choose one of {sorted(PREPROCESSING)}")
  h, w = img.shape[:2]
  frac = PREPROCESSING[method]
  if method == "fat":
    side = max(1, int(round(min(h, w) * frac)))
    top, left = (h - side) // 2, (w - side) // 2
    img = img[top:top + side, left:left + side]
  elif method == "crop0875":
    top, left = int((h - h * frac) / 2), int((w - w * frac) / 2)
    img = img[top:h - top, left:w - left]
  return resize_bilinear(img, size) / 127.5 - 1.0


def default_cache_dir() -> Path:
  return Path(os.environ.get("FATQ_CACHE", Path.home() / ".cache" / "fatq"))


def load_folder(folder, preprocessing: str = "fat", image_size: int = 224, labels_file=None,
                label_offset: int = 0, cache_dir=None, limit: int | None = None, use_cache: bool = True) -> ImageSet:
  """Images of ``folder`` (recursively), preprocessed, with labels if ``labels_file`` is given.

  With a label file only the files it lists are used (matched by file name); ``limit`` takes the first N files in
  sorted order. Results are cached in ``cache_dir`` (default ``$FATQ_CACHE`` or ``~/.cache/fatq``).
  """
  if preprocessing not in PREPROCESSING:
    raise ValueError(f"unknown preprocessing {preprocessing!r}; choose one of {sorted(PREPROCESSING)}")
  files = list_images(folder)
  labels = None
  if labels_file:
    table = read_labels(labels_file)
    unlabeled = [f for f in files if f.name not in table]
    if unlabeled:
      warnings.warn(f"{len(unlabeled)} image(s) in {folder} have no label in {labels_file} and are ignored, "
                    f"e.g. {unlabeled[0].name}")
    files = [f for f in files if f.name in table]
  if limit:
    files = files[:limit]
  if not files:
    raise FileNotFoundError(f"no JPEG/PNG images found in {folder}")
  key = hashlib.sha1(json.dumps([str(Path(folder).resolve()), preprocessing, image_size,
                                 [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files]]).encode())
  cache = Path(cache_dir or default_cache_dir()) / f"{Path(folder).name}_{preprocessing}_{image_size}_{key.hexdigest()[:16]}"
  images = None
  if use_cache and (cache.with_suffix(".npy")).exists() and cache.with_suffix(".json").exists():
    try:
      meta = json.loads(cache.with_suffix(".json").read_text())
      images = np.load(cache.with_suffix(".npy")).astype(np.float32)
      kept, skipped = meta["files"], meta["skipped"]
      if len(images) != len(kept) or not np.all(np.isfinite(images)):
        warnings.warn(f"the image cache {cache}.npy is damaged (NaN/Inf or a wrong image count); decoding again")
        images = None
    except (OSError, ValueError, KeyError):
      images = None
  if images is None:
    arrays, kept, skipped = [], [], []
    for f in files:
      try:
        arrays.append(preprocess(load_rgb(f), preprocessing, image_size).astype(np.float32))
        kept.append(str(f))
      except Exception as e:  # noqa: BLE001 - any undecodable file is skipped, never fatal
        warnings.warn(f"skipping unreadable image {f}: {type(e).__name__}: {e}")
        skipped.append(str(f))
    if not arrays:
      raise ValueError(f"none of the {len(files)} images in {folder} could be decoded")
    # Rounded to the cache's float16 also on the first run, so that a run gives the same numbers cached or not.
    images = np.stack(arrays).astype(np.float16).astype(np.float32)
    if use_cache:
      try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".npy"), images.astype(np.float16))
        cache.with_suffix(".json").write_text(json.dumps(dict(files=kept, skipped=skipped)))
      except OSError as e:
        warnings.warn(f"could not write the image cache {cache}: {e}")
  else:
    for s in skipped:
      warnings.warn(f"skipping unreadable image {s} (cached result)")
  if labels_file:
    labels = np.asarray([table[Path(f).name] + label_offset for f in kept], np.int32)
  return ImageSet(images, labels, kept, skipped)


def val_set(preprocessing: str = "fat", image_size: int = 224, label_offset: int = 0, limit=None, cache_dir=None,
            folder=None) -> ImageSet:
  """The labeled validation folder (default ``<data_root>/imagenet/val`` with its ``labels.txt``)."""
  from fatq.data.paths import resolve

  folder = resolve(folder, "imagenet/val")
  return load_folder(folder, preprocessing, image_size, folder / "labels.txt", label_offset, cache_dir, limit)


def unlabeled_set(preprocessing: str = "fat", image_size: int = 224, limit=None, cache_dir=None,
                  folder=None) -> ImageSet:
  """The unlabeled pool (default ``<data_root>/imagenet/unlabeled``) for calibration and FAT fine-tuning."""
  from fatq.data.paths import resolve

  return load_folder(resolve(folder, "imagenet/unlabeled"), preprocessing, image_size, None, 0, cache_dir, limit)
