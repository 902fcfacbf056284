"""ImageNet-style image folders, or a tfds dataset such as ``imagenet2012`` (:func:`load_tfds`), as numpy arrays:
decoding, preprocessing, labels and an on-disk cache. :func:`evaluation_set` and :func:`unlabeled_pool` pick the
source a config's ``data`` section names.

* Recursive ``*.jpg / *.jpeg / *.png`` (any case; symlinked folders followed; hidden files and folders, such as
  ``.ipynb_checkpoints``, skipped); grayscale (8 or 16 bit), CMYK, palette and RGBA images become RGB; a file that
  cannot be decoded (corrupt, truncated, not an image) is skipped with a warning and counted (never a crash). Images
  smaller than the crop are upsampled.
* Labeled folders use a label file of ``file, label`` lines (``#`` comments), 0-based 1000-class indices in
  sorted-synset order; ``label_offset=1`` maps them onto 1001-class TF-slim/TFLite models (class 0 = background).
  ``file`` is a path relative to the folder (``n01440764/a.JPEG``) or, where no two images share it, a bare file name.
* Preprocessing (``x / 127.5 - 1`` after a bilinear resize without antialiasing, half-pixel centres as
  ``tf.image.resize``):
    - ``'fat'``: central square crop of 0.85 of the short side (the FAT reference code);
    - ``'crop0875'``: central crop of 0.875 of each side (TF-slim's ``central_crop(0.875)`` evaluation);
    - ``'none'``: resize the whole image.
* Decoded and resized arrays are cached as ``.npy`` (float16; returned rounded to float16 also when computed) per
  (folder contents, preprocessing, size, limit) in ``cache_dir`` so that they are not recomputed every run. Each
  cache entry records its key, and is used only when the key matches; entries are written whole or not at all.

:func:`data_config` writes the ``data`` section itself, for the model configs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import os
import tarfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from fatq.fileio import write_atomically

EXTENSIONS = (".jpg", ".jpeg", ".png")
PREPROCESSING = {"fat": 0.85, "crop0875": 0.875, "none": 1.0}
VAL_FOLDER, UNLABELED_FOLDER = "imagenet/val", "imagenet/unlabeled"  # the embedded defaults, under the data root
EVAL_SPLIT, UNLABELED_SPLIT = "validation", "train[:1000]"  # tfds splits read when tfds_name is set
CACHE_VERSION = 2  # in every cache key: a change to decoding or preprocessing must not reuse older caches


def data_config(preprocessing: str = "fat", image_size: int = 224, **extra) -> dict:
  """A config's ``data`` section, every source at its default (what :func:`evaluation_set`, :func:`unlabeled_pool`
  and the ``*_source`` functions read):

  * ``val_dir`` / ``unlabeled_dir``: a labeled folder (with ``labels.txt``) and an unlabeled one; ``''`` is
    ``<data_root>/imagenet/val`` / ``imagenet/unlabeled``;
  * ``tfds_name``: read tfds instead (e.g. ``imagenet2012``) from ``tfds_data_dir``, with ``manual_dir`` for its
    archives; ``tfds_eval_split`` (default ``validation``) and ``tfds_unlabeled_split`` (``train[:1000]``);
  * ``preprocessing`` and ``image_size``: the model's (:func:`preprocess`);
  * ``cache_dir``: the decoded-image cache (``''``: :func:`default_cache_dir`);
  * ``val_limit``: evaluate on the first N labeled images only (0: all).

  ``extra`` adds or replaces keys (e.g. the fine-tuning configs' unlabeled split sizes)."""
  _check_preprocessing(preprocessing)
  return dict(dict(val_dir="", unlabeled_dir="", tfds_name="", tfds_data_dir="", manual_dir="",
                   tfds_eval_split=EVAL_SPLIT, tfds_unlabeled_split=UNLABELED_SPLIT, preprocessing=preprocessing,
                   image_size=int(image_size), cache_dir="", val_limit=0), **extra)


@dataclasses.dataclass
class ImageSet:
  images: np.ndarray  # (N, size, size, 3) float32 in [-1, 1]
  labels: np.ndarray | None  # (N,) int32, already offset
  files: list[str]
  skipped: list[str]  # files that could not be decoded


def list_images(folder: str | os.PathLike) -> list[Path]:
  """The JPEG/PNG files under ``folder``, sorted: recursively, following symlinked folders (each real folder once),
  skipping hidden files and folders (``.ipynb_checkpoints`` copies, macOS ``._`` files)."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"image folder {folder} does not exist")
  found, seen = [], set()
  for root, dirs, files in os.walk(folder, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:  # a symlink loop, or a folder linked twice
      dirs[:] = []
      continue
    seen.add(real)
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [Path(root) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in EXTENSIONS]
  broken = sorted(p for p in found if p.is_symlink() and not p.exists())
  if broken:
    warnings.warn(f"skipping {len(broken)} broken symlink(s) in {folder}, e.g. {broken[0]} -> "
                  f"{os.readlink(broken[0])}")
  return sorted(p for p in found if p.is_file())


def read_labels(path: str | os.PathLike) -> dict[str, int]:
  """``{file: label}`` from a ``file, label`` text file (comments start with ``#``; a UTF-8 byte-order mark is
  ignored). A file listed twice with two labels is an error."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"label file {path} not found: a labeled folder holds a labels.txt with one 'file, label' "
                            "line per image, e.g. 'ILSVRC2012_val_00000363.JPEG, 133' (an integer class index)")
  labels, lines = {}, {}
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    line = e.object[:e.start].count(b"\n") + 1
    raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}): save the label file as UTF-8")\
        from None
  for n, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    try:
      name, label = line.rsplit(",", 1)
      name, label = name.strip(), int(label)
    except ValueError:
      raise ValueError(f"{path}:{n}: expected 'file, label', got {line!r}") from None
    if not 0 <= label < 2**31:
      raise ValueError(f"{path}:{n}: label {label} of {name}: labels are 0-based class indices")
    if labels.get(name, label) != label:
      raise ValueError(f"{path}:{n}: {name} is labeled {label} here and {labels[name]} on line {lines[name]}: keep "
                       "one line per image")
    labels[name], lines[name] = label, n
  return labels


def match_labels(files: Sequence[Path], folder: Path, table: dict[str, int], labels_file) -> dict[Path, int]:
  """``{file: label}`` for the ``files`` of ``folder`` that ``table`` (:func:`read_labels`) lists: by the path
  relative to ``folder`` (``/``-separated), or by file name where the table lists bare names. Raises where a bare name
  would label two images; warns about images without a label and listed files that are missing."""
  relative = {f: f.relative_to(folder).as_posix() for f in files}
  by_name: dict[str, list[Path]] = {}
  for f in files:
    by_name.setdefault(f.name, []).append(f)
  found, used = {}, set()
  for f in files:
    if relative[f] in table:
      key = relative[f]
      if f.name != key and table.get(f.name, table[key]) != table[key]:
        raise ValueError(f"{labels_file} labels {key} {table[key]} by its path and {table[f.name]} by its name "
                         f"{f.name!r}: keep one line per image")
    elif f.name in table:
      key = f.name
    else:
      continue
    if key != relative[f] and len(by_name[key]) > 1:  # a bare name that two images have
      raise ValueError(f"{labels_file} labels {key!r}, but {len(by_name[key])} images in {folder} have that name "
                       f"({', '.join(relative[g] for g in by_name[key][:3])}): list them by their paths relative to "
                       "the folder")
    found[f] = table[key]
    used.add(key)
  if not found and files:
    raise FileNotFoundError(f"none of the {len(files)} images in {folder} is listed in {labels_file} (it lists e.g. "
                            f"{next(iter(table), 'nothing')!r}; the folder holds e.g. {relative[files[0]]!r}): name "
                            "each image by its path relative to the folder, or by its file name")
  unlabeled = [f for f in files if f not in found]
  if unlabeled:
    warnings.warn(f"{len(unlabeled)} image(s) in {folder} have no label in {labels_file} and are ignored, "
                  f"e.g. {relative[unlabeled[0]]}")
  missing = [k for k in table if k not in used]
  if missing:
    warnings.warn(f"{len(missing)} file(s) listed in {labels_file} are not images in {folder}, e.g. {missing[0]}")
  return found


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
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:  # tRNS: one colour transparent
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


def _check_image_size(size) -> None:
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"image_size {size!r}: must be a positive integer (pixels; set data.image_size)")


def _check_preprocessing(method: str) -> None:
  if method not in PREPROCESSING:
    raise ValueError(f"unknown preprocessing {method!r}; choose one of {sorted(PREPROCESSING)}")


def preprocess(img: np.ndarray, method: str = "fat", size: int = 224) -> np.ndarray:
  """Crop, resize and scale one ``uint8 (H, W, 3)`` image to ``float32 (size, size, 3)`` in [-1, 1]."""
  _check_preprocessing(method)
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
  return Path(os.environ.get("FATQ_CACHE", Path.home() / ".cache" / "fatq")).expanduser()


def load_folder(folder, preprocessing: str = "fat", image_size: int = 224, labels_file=None,
                label_offset: int = 0, cache_dir=None, limit: int | None = None, use_cache: bool = True,
                progress: bool = False) -> ImageSet:
  """Images of ``folder`` (recursively), preprocessed, with labels if ``labels_file`` is given.

  With a label file only the files it lists are used (:func:`match_labels`); ``limit`` takes the first N files in
  sorted order. Results are cached in ``cache_dir`` (default ``$FATQ_CACHE`` or ``~/.cache/fatq``).
  """
  _check_preprocessing(preprocessing)  # before any decoding
  _check_image_size(image_size)
  folder = Path(folder)
  files = list_images(folder)
  labels = None
  if labels_file and files:
    label_of = match_labels(files, folder, read_labels(labels_file), labels_file)
    files = [f for f in files if f in label_of]
  if limit:
    files = files[:limit]
  if not files:
    raise FileNotFoundError(f"no JPEG/PNG images found in {folder}")
  # ctime as well as mtime: a file replaced by one of the same size and mtime (cp -p, rsync -t) has a new ctime,
  # which no program can set back
  key = _cache_key(str(folder.resolve()), preprocessing, image_size,
                   [(str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for f in files
                    for st in [f.stat()]])
  cache = _cache_path(cache_dir, folder.name, preprocessing, image_size, key)
  images, kept, skipped, _ = _decode_cached(cache, key, lambda: ((str(f), f, None) for f in files), preprocessing,
                                            image_size, use_cache, f"the {len(files)} images in {folder}", progress)
  if labels_file:
    label_of = {str(f): label for f, label in label_of.items()}
    labels = np.asarray([label_of[f] + label_offset for f in kept], np.int32)
  return ImageSet(images, labels, kept, skipped)


def _cache_key(*parts) -> str:
  return hashlib.sha1(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()


def _cache_path(cache_dir, name: str, preprocessing: str, image_size: int, key: str) -> Path:
  """``<cache_dir>/<name>_<preprocessing>_<size>_<key>``, the stem of a cache entry's ``.npy`` and ``.json``; the
  name made safe for a file name (a dot would read as a suffix, ``:`` is not allowed everywhere)."""
  safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
  return Path(cache_dir or default_cache_dir()).expanduser() / f"{safe}_{preprocessing}_{image_size}_{key[:16]}"


def load_tfds(name: str, split: str, preprocessing: str = "fat", image_size: int = 224, labeled: bool = True,
              label_offset: int = 0, data_dir=None, manual_dir=None, cache_dir=None, limit: int | None = None,
              use_cache: bool = True, progress: bool = True) -> ImageSet:
  """The images of a tfds image-classification dataset's ``split`` (``'validation'``, ``'train[:1000]'``), with its
  ``label`` feature if ``labeled``, preprocessed and cached like :func:`load_folder`.

  ``imagenet2012``: tfds keeps each JPEG's bytes, which are decoded here with :func:`load_rgb`, so the same file
  gives the same array from tfds and from a folder, and its labels are the sorted-synset indices of a folder's
  label file. A dataset not yet prepared in ``data_dir`` (default ``$FATQ_TFDS_DIR`` or ``~/tensorflow_datasets``)
  is prepared once from ``manual_dir`` (for ImageNet: ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``).
  """
  import tensorflow_datasets as tfds

  from fatq.data.paths import tfds_dir

  _check_preprocessing(preprocessing)  # before any decoding (or tfds preparation)
  _check_image_size(image_size)
  data_dir = Path(data_dir or tfds_dir()).expanduser()
  try:
    builder = tfds.builder(name, data_dir=str(data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    # the built-in names only: the community index is fetched from the network
    close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=1)
    raise ValueError(f"tfds has no dataset {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                     + "; set --config.data.tfds_name, or leave it empty to read image folders") from None
  if not builder.is_prepared():
    if not manual_dir:
      raise FileNotFoundError(f"tfds dataset {name} is not prepared in {data_dir}: point --config.data.manual_dir at "
                              f"its downloaded files to prepare it once ({_instructions(builder)})")
    manual_dir = Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
      raise FileNotFoundError(f"manual_dir {manual_dir} does not exist: it must hold the downloaded files of tfds "
                              f"{name} ({_instructions(builder)})")
    print(f"preparing tfds {name} from {manual_dir} in {data_dir}, once (the whole ImageNet takes hours)")
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    except AssertionError as e:  # imagenet2012 asserts that some split's tar is there
      raise FileNotFoundError(f"cannot prepare tfds {name} from {manual_dir}: {_instructions(builder)} "
                              f"(tfds: {str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - a damaged download surfaces as tarfile's, TF's or the OS's error
      if not isinstance(e, (tarfile.TarError, EOFError, OSError)) and not type(e).__module__.startswith("tensorflow"):
        raise
      raise ValueError(f"cannot prepare tfds {name} from {manual_dir}: a file there is damaged or incomplete "
                       f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); download it again "
                       f"({_instructions(builder)})") from None
  features = builder.info.features
  if "image" not in features or (labeled and "label" not in features):
    raise ValueError(f"tfds {name} has no {'image' if 'image' not in features else 'label'} feature "
                     f"(features: {', '.join(features)}): fatq needs an image classification dataset")
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:  # an unknown split, or a slice past its end
    raise ValueError(f"tfds {name}: cannot read split {split!r} ({str(e).splitlines()[0]}); its splits: "
                     + ", ".join(f"{k} ({n} images)" for k, n in splits.items())) from None
  count = min(num_examples, limit) if limit else num_examples
  # the prepared records' identity: a dataset prepared again (other tars, the same split sizes) is decoded again
  info = Path(builder.data_dir, "dataset_info.json").stat()
  key = _cache_key(str(data_dir.resolve()), name, str(builder.version), split, count, labeled, preprocessing,
                   image_size, splits, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
  cache = _cache_path(cache_dir, f"tfds_{name}", preprocessing, image_size, key)

  def examples():
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    for i, ex in enumerate(tfds.as_numpy(ds.take(count))):
      file_name = ex.get("file_name", f"{name}/{split}/{i}")
      yield (file_name.decode() if isinstance(file_name, bytes) else file_name, io.BytesIO(ex["image"]),
             int(ex["label"]) if labeled else None)  # cached without the offset, which is applied below

  images, kept, skipped, labels = _decode_cached(cache, key, examples, preprocessing, image_size, use_cache,
                                                 f"the {count} images of tfds {name} {split}", progress=progress)
  if labeled and min(labels) < 0:  # ImageNet's test split: label -1 on every image
    raise ValueError(f"tfds {name} {split} has no labels (label -1): evaluate on a labeled split, such as "
                     "--config.data.tfds_eval_split=validation")
  return ImageSet(images, np.asarray(labels, np.int32) + label_offset if labeled else None, kept, skipped)


def _instructions(builder) -> str:
  return " ".join(str(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", "") or "see the dataset's tfds page").split())


def _decode_cached(cache: Path, key: str, examples, preprocessing: str, image_size: int, use_cache: bool, what: str,
                   progress: bool = False) -> tuple[np.ndarray, list[str], list[str], list[int] | None]:
  """``(images, kept names, skipped names, labels or None)`` from ``cache`` (``.npy`` + ``.json``) if it is there
  with this ``key``, else by decoding ``examples()``, an iterable of ``(name, file path or object, label or None)``,
  and caching them."""
  npy, meta_file = _suffixed(cache, ".npy"), _suffixed(cache, ".json")
  if use_cache and npy.exists() and meta_file.exists():
    try:
      meta = json.loads(meta_file.read_text())
      if meta.get("key") == key:  # an entry of another key (or of older code, without one) is decoded again
        images = np.load(npy).astype(np.float32)
        if len(images) == len(meta["files"]) and np.all(np.isfinite(images)):
          for s in meta["skipped"]:
            warnings.warn(f"skipping unreadable image {s} (cached result)")
          return images, meta["files"], meta["skipped"], meta.get("labels")
        warnings.warn(f"the image cache {npy} is damaged (NaN/Inf or a wrong image count); decoding again")
    except (OSError, ValueError, KeyError, EOFError):  # EOFError: an empty .npy
      warnings.warn(f"the image cache {npy} cannot be read; decoding again")
  from tqdm.auto import tqdm

  arrays, kept, skipped, labels = [], [], [], []
  for name, source, label in tqdm(examples(), desc="decoding images", unit="img", disable=not progress):
    try:
      arrays.append(preprocess(load_rgb(source), preprocessing, image_size).astype(np.float32))
    except Exception as e:  # noqa: BLE001 - any undecodable file is skipped, never fatal
      warnings.warn(f"skipping unreadable image {name}: {type(e).__name__}: {e}")
      skipped.append(name)
      continue
    kept.append(name)
    labels.append(label)
  if not arrays:
    raise ValueError(f"none of {what} could be decoded")
  labels = None if any(label is None for label in labels) else [int(label) for label in labels]
  # Rounded to the cache's float16 also on the first run, so that a run gives the same numbers cached or not.
  images = np.stack(arrays).astype(np.float16).astype(np.float32)
  if use_cache:
    try:
      cache.parent.mkdir(parents=True, exist_ok=True)
      meta = dict(key=key, files=kept, skipped=skipped, **({"labels": labels} if labels is not None else {}))
      # the .json last: an entry is complete when its .json names its key; each file is renamed into place whole, so
      # an interrupted or concurrent write never leaves a partial file under the entry's name
      write_atomically(npy, lambda f: np.save(f, images.astype(np.float16)), "wb")
      write_atomically(meta_file, lambda f: json.dump(meta, f))
    except OSError as e:
      warnings.warn(f"could not write the image cache {cache}: {e}")
  return images, kept, skipped, labels


def _suffixed(path: Path, suffix: str) -> Path:
  return path.with_name(path.name + suffix)  # not with_suffix: it would cut a name at its last dot


def shared_images(a: ImageSet, b: ImageSet) -> list[str]:
  """The images of ``a`` that ``b`` holds too: the same file (however its folder was spelled: relative, absolute,
  through a symlink), or for tfds the same file name."""
  def identity(name):
    return os.path.realpath(name) if os.path.exists(name) else name  # a folder's file; else a tfds name

  in_b = {identity(f) for f in b.files}
  return [f for f in a.files if identity(f) in in_b]


def evaluation_set(d, label_offset: int = 0, limit: int | None = None, progress: bool = True) -> ImageSet:
  """The labeled evaluation images a config's ``data`` section names: tfds ``tfds_name``'s ``tfds_eval_split`` if
  ``tfds_name`` is set, else the folder ``val_dir`` (default ``<data_root>/imagenet/val``) with its ``labels.txt``."""
  common = _common(d)
  if d.get("tfds_name", ""):
    return load_tfds(d.tfds_name, _eval_split(d), labeled=True, label_offset=label_offset,
                     limit=limit, progress=progress, **_tfds_dirs(d), **common)
  return val_set(label_offset=label_offset, limit=limit, folder=d.get("val_dir", "") or None, progress=progress,
                 **common)


def evaluation_source(d) -> str:
  """Where :func:`evaluation_set` reads from, for results files: ``tfds NAME SPLIT`` or the folder."""
  return _source(d, _eval_split(d), "val_dir", VAL_FOLDER)


def unlabeled_source(d) -> str:
  """Where :func:`unlabeled_pool` reads from, for results files: ``tfds NAME SPLIT`` or the folder."""
  return _source(d, _unlabeled_split(d), "unlabeled_dir", UNLABELED_FOLDER)


def sources(d) -> dict[str, str]:
  """``{'unlabeled': ..., 'evaluation': ...}``: where a config's ``data`` section reads each set (results files)."""
  return {"unlabeled": unlabeled_source(d), "evaluation": evaluation_source(d)}


def _source(d, split: str, folder_key: str, default: str) -> str:
  from fatq.data.paths import resolve

  if d.get("tfds_name", ""):
    return f"tfds {d.tfds_name} {split}"
  return str(resolve(d.get(folder_key, "") or None, default))


def unlabeled_pool(d, progress: bool = True) -> ImageSet:
  """The unlabeled images a config's ``data`` section names (calibration, fine-tuning, held-out loss; labels never
  read): tfds ``tfds_name``'s ``tfds_unlabeled_split`` if ``tfds_name`` is set, else the folder ``unlabeled_dir``
  (default ``<data_root>/imagenet/unlabeled``)."""
  common = _common(d)
  if d.get("tfds_name", ""):
    return load_tfds(d.tfds_name, _unlabeled_split(d), labeled=False, progress=progress,
                     **_tfds_dirs(d), **common)
  return unlabeled_set(folder=d.get("unlabeled_dir", "") or None, progress=progress, **common)


def _common(d) -> dict:
  return dict(preprocessing=d.preprocessing, image_size=int(d.image_size), cache_dir=d.get("cache_dir", "") or None)


def _eval_split(d) -> str:
  return d.get("tfds_eval_split", EVAL_SPLIT)


def _unlabeled_split(d) -> str:
  return d.get("tfds_unlabeled_split", UNLABELED_SPLIT)


def _tfds_dirs(d) -> dict:
  return dict(data_dir=d.get("tfds_data_dir", "") or None, manual_dir=d.get("manual_dir", "") or None)


def val_set(preprocessing: str = "fat", image_size: int = 224, label_offset: int = 0, limit=None, cache_dir=None,
            folder=None, progress: bool = False) -> ImageSet:
  """The labeled validation folder (default ``<data_root>/imagenet/val`` with its ``labels.txt``)."""
  from fatq.data.paths import resolve

  folder = resolve(folder, VAL_FOLDER)
  return load_folder(folder, preprocessing, image_size, folder / "labels.txt", label_offset, cache_dir, limit,
                     progress=progress)


def unlabeled_set(preprocessing: str = "fat", image_size: int = 224, limit=None, cache_dir=None,
                  folder=None, progress: bool = False) -> ImageSet:
  """The unlabeled pool (default ``<data_root>/imagenet/unlabeled``) for calibration and FAT fine-tuning."""
  from fatq.data.paths import resolve

  return load_folder(resolve(folder, UNLABELED_FOLDER), preprocessing, image_size, None, 0, cache_dir, limit,
                     progress=progress)
