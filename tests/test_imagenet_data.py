"""ImageNet-style folders: decoding odd images, corrupt files, labels, preprocessing and the cache."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fatq.data import data_root, imagenet


@pytest.fixture
def folder(tmp_path):
  d = tmp_path / "imgs"
  (d / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (40, 60, 3), np.uint8)
  Image.fromarray(rgb).save(d / "a_rgb.JPEG", quality=95)
  Image.fromarray(rgb[..., 0]).save(d / "b_gray.jpg")  # grayscale
  Image.fromarray(rgb).convert("CMYK").save(d / "sub" / "c_cmyk.jpg")  # CMYK JPEG, in a subfolder
  rgba = np.concatenate([rgb, np.full((40, 60, 1), 255, np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(d / "d_rgba.png")
  Image.fromarray(rgb).convert("P").save(d / "e_palette.png")
  (d / "f_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
  (d / "notes.txt").write_text("ignored")
  (d / "labels.txt").write_text("# file, label\na_rgb.JPEG, 3\nb_gray.jpg, 0\nc_cmyk.jpg, 999\nd_rgba.png, 5\n"
                                "e_palette.png, 7\nf_corrupt.jpg, 1\n")
  return d


def test_folder_decoding_and_labels(folder, tmp_path):
  with pytest.warns(UserWarning, match="f_corrupt.jpg"):
    s = imagenet.load_folder(folder, "fat", 16, folder / "labels.txt", label_offset=1, cache_dir=tmp_path / "c")
  assert s.images.shape == (5, 16, 16, 3) and s.images.dtype == np.float32
  assert len(s.skipped) == 1 and s.skipped[0].endswith("f_corrupt.jpg")
  assert [f.rsplit("/", 1)[-1] for f in s.files] == ["a_rgb.JPEG", "b_gray.jpg", "d_rgba.png", "e_palette.png",
                                                     "c_cmyk.jpg"]
  np.testing.assert_array_equal(s.labels, [4, 1, 6, 8, 1000])
  assert s.images.min() >= -1 and s.images.max() <= 1
  gray = s.images[1]
  np.testing.assert_allclose(gray[..., 0], gray[..., 2])  # grayscale -> 3 equal channels
  np.testing.assert_allclose(s.images[2], imagenet.preprocess(np.asarray(Image.open(folder / "d_rgba.png"))[..., :3],
                                                               "fat", 16), atol=2e-3)
  unlabeled = imagenet.load_folder(folder, "crop0875", 16, cache_dir=tmp_path / "c")
  assert unlabeled.labels is None and len(unlabeled.images) == 5
  with pytest.raises(FileNotFoundError, match=r"label file .*none.txt not found: .* one 'file, label' line per image"):
    imagenet.load_folder(folder, "fat", 16, folder / "none.txt")


def test_cache_is_used(folder, tmp_path, monkeypatch):
  first = imagenet.load_folder(folder, "fat", 16, folder / "labels.txt", cache_dir=tmp_path / "c")
  assert list((tmp_path / "c").glob("*.npy"))

  def boom(path):
    raise AssertionError("decoded again despite the cache")

  monkeypatch.setattr(imagenet, "load_rgb", boom)
  second = imagenet.load_folder(folder, "fat", 16, folder / "labels.txt", cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(first.images, second.images)
  assert second.skipped == first.skipped
  with pytest.raises(ValueError, match="none of the"), pytest.warns(UserWarning, match="decoded again"):
    imagenet.load_folder(folder, "crop0875", 16, folder / "labels.txt", cache_dir=tmp_path / "c")


def _images(folder, names, seed=0):
  rng = np.random.default_rng(seed)
  for name in names:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(folder / name)


def test_cache_entries_of_dotted_names_stay_apart(tmp_path):
  """A folder name with a dot (``imagenet.val``) named its cache entry up to the dot only: the pool of
  ``imagenet.unlabeled`` came back as the ``imagenet.val`` images, and another size as the old one."""
  val, pool = tmp_path / "imagenet.val", tmp_path / "imagenet.unlabeled"
  _images(val, ["v0.png", "v1.png"], seed=1)
  _images(pool, ["u0.png", "u1.png", "u2.png"], seed=2)
  a = imagenet.load_folder(val, "fat", 16, cache_dir=tmp_path / "c")
  b = imagenet.load_folder(pool, "fat", 16, cache_dir=tmp_path / "c")
  assert [len(a.images), len(b.images)] == [2, 3] and all("imagenet.unlabeled" in f for f in b.files)
  assert imagenet.load_folder(val, "crop0875", 12, cache_dir=tmp_path / "c").images.shape == (2, 12, 12, 3)
  assert len(list((tmp_path / "c").glob("*.npy"))) == 3  # one entry each, none overwritten
  np.testing.assert_array_equal(imagenet.load_folder(pool, "fat", 16, cache_dir=tmp_path / "c").images, b.images)


def test_cache_entry_of_another_key_or_half_written_is_decoded_again(tmp_path, monkeypatch):
  _images(tmp_path / "imgs", ["a.png", "b.png"])
  first = imagenet.load_folder(tmp_path / "imgs", "fat", 16, cache_dir=tmp_path / "c")
  (npy,) = (tmp_path / "c").glob("*.npy")
  npy.write_bytes(b"")  # a write cut short (or an older fatq's entry) must not be read as these images
  with pytest.warns(UserWarning, match="cannot be read; decoding again"):
    again = imagenet.load_folder(tmp_path / "imgs", "fat", 16, cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(again.images, first.images)
  meta = npy.with_name(npy.name.removesuffix(".npy") + ".json")
  meta.write_text(meta.read_text().replace('"key": "', '"key": "0'))  # an entry written for other images
  monkeypatch.setattr(imagenet, "load_rgb", lambda p: np.zeros((20, 24, 3), np.uint8))
  assert imagenet.load_folder(tmp_path / "imgs", "fat", 16, cache_dir=tmp_path / "c").images.max() == -1.0
  assert not list((tmp_path / "c").glob("*.tmp"))


def test_labels_by_relative_path_and_names_that_two_images_share(tmp_path):
  d = tmp_path / "val"
  _images(d, ["cat/1.png", "dog/1.png", "top.png"])
  (d / "labels.txt").write_text("\ufeffcat/1.png, 3\ndog/1.png, 5\ntop.png, 7\ntop.png, 7\n", encoding="utf-8")
  s = imagenet.load_folder(d, "fat", 8, d / "labels.txt", cache_dir=tmp_path / "c")  # a BOM, a repeated line
  assert [f.rsplit("/", 2)[-2:] for f in s.files] == [["cat", "1.png"], ["dog", "1.png"], ["val", "top.png"]]
  np.testing.assert_array_equal(s.labels, [3, 5, 7])
  (d / "labels.txt").write_text("1.png, 3\ntop.png, 7\n")
  with pytest.raises(ValueError, match=r"labels '1.png', but 2 images .* have that name \(cat/1.png, dog/1.png\)"):
    imagenet.load_folder(d, "fat", 8, d / "labels.txt", cache_dir=tmp_path / "c")
  (d / "labels.txt").write_text("top.png, 7\ncat/1.png, 2\ntop.png, 4\n")
  with pytest.raises(ValueError, match=r"labels.txt:3: top.png is labeled 4 here and 7 on line 1"):
    imagenet.load_folder(d, "fat", 8, d / "labels.txt", cache_dir=tmp_path / "c")
  (d / "labels.txt").write_text("x/top.png, 7\n")
  with pytest.raises(FileNotFoundError, match=r"none of the 3 images .* is listed .*it lists e.g. 'x/top.png'"):
    imagenet.load_folder(d, "fat", 8, d / "labels.txt", cache_dir=tmp_path / "c")
  (d / "labels.txt").write_text("top.png, 7\ngone.png, 1\ncat/1.png, 2\ndog/1.png, 2\n")
  with pytest.warns(UserWarning, match="1 file.* listed in .* are not images .* e.g. gone.png"):
    imagenet.load_folder(d, "fat", 8, d / "labels.txt", cache_dir=tmp_path / "c")


def test_listing_follows_symlinked_folders_and_skips_hidden_files(tmp_path):
  d = tmp_path / "pool"
  _images(d, ["a.png", ".ipynb_checkpoints/a.png", "._b.png"])
  _images(tmp_path / "elsewhere", ["c.JPG"])
  (d / "linked").symlink_to(tmp_path / "elsewhere")
  (d / "loop").symlink_to(d)  # each real folder is read once
  assert [p.relative_to(d).as_posix() for p in imagenet.list_images(d)] == ["a.png", "linked/c.JPG"]


def test_shared_images_between_evaluation_and_unlabeled_sets(tmp_path):
  _images(tmp_path / "val", ["a.png", "b.png"])
  (tmp_path / "pool").mkdir()
  (tmp_path / "pool" / "val").symlink_to(tmp_path / "val")  # the validation folder inside the pool
  _images(tmp_path / "pool", ["c.png"])
  val = imagenet.load_folder(tmp_path / "val", "fat", 8, cache_dir=tmp_path / "c")
  pool = imagenet.load_folder(tmp_path / "pool", "fat", 8, cache_dir=tmp_path / "c")
  assert imagenet.shared_images(val, pool) == val.files and len(pool.files) == 3
  alone = imagenet.load_folder(tmp_path / "pool", "fat", 8, cache_dir=tmp_path / "c", limit=1)
  assert imagenet.shared_images(val, alone) == []


def test_preprocessing_crops():
  img = np.zeros((100, 200, 3), np.uint8)
  img[:, 50:150] = 255  # the central 100x100 square is white, the sides black
  fat = imagenet.preprocess(img, "fat", 10)  # 85x85 central square: all white
  np.testing.assert_allclose(fat, 1.0)
  full = imagenet.preprocess(img, "none", 10)
  assert full.min() == -1.0
  c = imagenet.preprocess(img, "crop0875", 20)  # 87.5% of each side: black borders remain
  assert c.min() == -1.0 and c[:, 10].min() == 1.0
  with pytest.raises(ValueError, match="unknown preprocessing"):
    imagenet.preprocess(img, "random", 10)


def test_resize_matches_tf():
  tf = pytest.importorskip("tensorflow")
  img = np.random.default_rng(0).integers(0, 256, (57, 83, 3)).astype(np.uint8)
  want = tf.image.resize(img.astype(np.float32), (24, 24), method="bilinear", antialias=False).numpy()
  np.testing.assert_allclose(imagenet.resize_bilinear(img, 24), want, atol=5e-3)  # float32 rounding, 0..255


def test_real_val_folder():
  s = imagenet.val_set("fat", 64, label_offset=0, limit=4)
  table = imagenet.read_labels(data_root() / "imagenet" / "val" / "labels.txt")
  assert len(table) == 1000 and all(0 <= v < 1000 for v in table.values())
  assert [table[f.rsplit("/", 1)[-1]] for f in s.files] == list(s.labels)
  assert s.images.shape == (4, 64, 64, 3)
  u = imagenet.unlabeled_set("fat", 32, limit=3)
  assert u.labels is None and u.images.shape == (3, 32, 32, 3)


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError):
    imagenet.load_folder(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no JPEG/PNG"):
    imagenet.load_folder(tmp_path / "empty")


def test_sources_name_the_folders_read(tmp_path, monkeypatch):
  """What results.json records as the sources: the user's folders, else the embedded ones under the data root."""
  import ml_collections

  d = ml_collections.ConfigDict(dict(val_dir=str(tmp_path / "v"), unlabeled_dir=str(tmp_path / "u"), tfds_name=""))
  assert (imagenet.evaluation_source(d), imagenet.unlabeled_source(d)) == (str(tmp_path / "v"), str(tmp_path / "u"))
  assert imagenet.sources(d) == {"unlabeled": str(tmp_path / "u"), "evaluation": str(tmp_path / "v")}
  monkeypatch.setenv("FATQ_DATA", str(tmp_path / "root"))
  d.val_dir = d.unlabeled_dir = ""
  assert imagenet.evaluation_source(d) == str(tmp_path / "root" / "imagenet" / "val")
  assert imagenet.unlabeled_source(d) == str(tmp_path / "root" / "imagenet" / "unlabeled")


def test_data_config_is_the_section_the_readers_use(tmp_path, monkeypatch):
  """The model configs' ``data`` section: every source at its default, the model's preprocessing, extra keys."""
  import ml_collections

  monkeypatch.setenv("FATQ_DATA", str(tmp_path))
  d = ml_collections.ConfigDict(imagenet.data_config("crop0875", 192, num_holdout=7, val_limit=3))
  assert (d.preprocessing, d.image_size, d.num_holdout, d.val_limit, d.cache_dir) == ("crop0875", 192, 7, 3, "")
  assert imagenet.evaluation_source(d) == str(tmp_path / "imagenet" / "val")
  assert imagenet.unlabeled_source(d) == str(tmp_path / "imagenet" / "unlabeled")
  d.tfds_name = "imagenet2012"
  assert imagenet.evaluation_source(d) == "tfds imagenet2012 validation"
  assert imagenet.unlabeled_source(d) == "tfds imagenet2012 train[:1000]"
  with pytest.raises(ValueError, match="unknown preprocessing 'inception'; choose one of"):
    imagenet.data_config("inception")


# ---------------------------------------------------------------------------------------------------------------------
# tfds imagenet2012 through manual_dir: a miniature ILSVRC2012 in the layout of the real tars, from the real images.


def _ilsvrc_tars(manual, val_files, train_files):
  """``ILSVRC2012_img_val.tar`` (``val_files`` as ``ILSVRC2012_val_0000000k.JPEG``, k from 1: tfds labels the
  sorted names by position), ``ILSVRC2012_img_test.tar`` (two of them) and ``ILSVRC2012_img_train.tar`` (one tar
  per synset of ``{synset: files}``)."""
  import io
  import tarfile

  manual.mkdir()
  for split, files in (("val", val_files), ("test", val_files[:2])):  # the test split has no labels
    with tarfile.open(manual / f"ILSVRC2012_img_{split}.tar", "w") as t:
      for k, f in enumerate(files, 1):
        t.add(f, arcname=f"ILSVRC2012_{split}_{k:08d}.JPEG")
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
    for synset, files in train_files.items():
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as inner:
        for f in files:
          inner.add(f, arcname=f.name)
      info = tarfile.TarInfo(f"{synset}.tar")
      info.size = buf.tell()
      buf.seek(0)
      outer.addfile(info, buf)


def _tfds_labels():
  from tensorflow_datasets.core.utils import resource_utils

  root = resource_utils.tfds_path("datasets/imagenet2012")
  synsets = (root / "labels.txt").read_text().split()
  return {s: i for i, s in enumerate(synsets)}, (root / "validation_labels.txt").read_text().split()


def test_embedded_val_labels_are_tfds_imagenet2012_labels():
  pytest.importorskip("tensorflow_datasets")
  index, validation = _tfds_labels()
  assert list(index) == sorted(index) and len(index) == 1000 and len(validation) == 50_000
  table = imagenet.read_labels(data_root() / "imagenet" / "val" / "labels.txt")
  for name, label in table.items():  # ILSVRC2012_val_00000363.JPEG: the 363rd line
    assert index[validation[int(name.rsplit("_", 1)[1].split(".")[0]) - 1]] == label, name


def test_tfds_imagenet2012_from_manual_dir_gives_the_folder_arrays(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow")
  import ml_collections
  import shutil

  index, validation = _tfds_labels()
  val_files = imagenet.list_images(data_root() / "imagenet" / "val")[:6]
  pool = imagenet.list_images(data_root() / "imagenet" / "unlabeled")[:6]
  corrupt = tmp_path / "n01440764_666.JPEG"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
  _ilsvrc_tars(tmp_path / "manual", val_files, {"n01440764": pool[0::2] + [corrupt], "n01443537": pool[1::2]})
  d = ml_collections.ConfigDict(dict(tfds_name="imagenet2012", tfds_data_dir=str(tmp_path / "tfds"),
                                     manual_dir="", tfds_eval_split="validation", tfds_unlabeled_split="train",
                                     preprocessing="fat", image_size=32, cache_dir=str(tmp_path / "cache")))
  with pytest.raises(FileNotFoundError, match=r"imagenet2012 is not prepared in .*tfds: point --config.data.manual_dir"
                                              r" at .*ILSVRC2012_img_train.tar"):
    imagenet.evaluation_set(d)
  (tmp_path / "empty").mkdir()
  d.manual_dir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"cannot prepare tfds imagenet2012 from .*empty: .*img_val.tar"):
    imagenet.evaluation_set(d)

  (tmp_path / "junk").mkdir()  # a damaged download: tarfile's traceback before
  (tmp_path / "junk" / "ILSVRC2012_img_val.tar").write_bytes(b"not a tar file " * 100)
  d.manual_dir = str(tmp_path / "junk")
  with pytest.raises(ValueError, match=r"cannot prepare tfds imagenet2012 from .*junk: a file there is damaged or "
                                       r"incomplete \(ReadError: .*\); download it again"):
    imagenet.evaluation_set(d)

  d.manual_dir = str(tmp_path / "manual")
  val = imagenet.evaluation_set(d, label_offset=1)  # prepares the dataset, once
  assert sorted(val.files) == [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 7)] and not val.skipped
  # the same arrays as the same JPEG files read from a folder, and tfds' labels shifted for a 1001-class model
  folder = tmp_path / "val"
  folder.mkdir()
  for k, f in enumerate(val_files, 1):
    shutil.copy(f, folder / f"ILSVRC2012_val_{k:08d}.JPEG")
  (folder / "labels.txt").write_text("".join(f"ILSVRC2012_val_{k:08d}.JPEG, {index[validation[k - 1]]}\n"
                                             for k in range(1, 7)))
  want = imagenet.load_folder(folder, "fat", 32, folder / "labels.txt", label_offset=1, cache_dir=tmp_path / "c2")
  order = np.argsort(val.files)
  np.testing.assert_array_equal(val.images[order], want.images)
  np.testing.assert_array_equal(val.labels[order], want.labels)

  with pytest.warns(UserWarning, match="skipping unreadable image n01440764_666.JPEG"):
    unlabeled = imagenet.unlabeled_pool(d)
  assert unlabeled.labels is None and unlabeled.skipped == ["n01440764_666.JPEG"] and len(unlabeled.images) == 6
  by_name = dict(zip(unlabeled.files, unlabeled.images))
  for f in pool:
    np.testing.assert_array_equal(by_name[f.name], imagenet.preprocess(imagenet.load_rgb(f), "fat", 32)
                                  .astype(np.float16).astype(np.float32))

  monkeypatch.setattr(imagenet, "load_rgb", lambda source: pytest.fail("decoded again despite the cache"))
  again = imagenet.evaluation_set(d)  # from the cache, which holds tfds' labels without the offset
  np.testing.assert_array_equal(again.images, val.images)
  np.testing.assert_array_equal(again.labels, val.labels - 1)
  assert imagenet.evaluation_source(d) == "tfds imagenet2012 validation"
  assert imagenet.unlabeled_source(d) == f"tfds imagenet2012 {d.tfds_unlabeled_split}"
  monkeypatch.undo()

  # prepared again from other tars with the same split sizes: read again, not served from the cache
  shutil.rmtree(tmp_path / "tfds")
  _ilsvrc_tars(tmp_path / "manual2", val_files[::-1], {"n01440764": pool[0::2] + [corrupt], "n01443537": pool[1::2]})
  d.manual_dir = str(tmp_path / "manual2")
  reversed_val = imagenet.evaluation_set(d)
  by_file = dict(zip(val.files, val.images))
  for k, image in zip(reversed_val.files, reversed_val.images):  # ILSVRC2012_val_0000000k holds what 7 - k held
    np.testing.assert_array_equal(image, by_file[f"ILSVRC2012_val_{7 - int(k[-10:-5]):08d}.JPEG"])

  d.tfds_eval_split = "valid"
  with pytest.raises(ValueError, match=r"tfds imagenet2012: cannot read split 'valid' .*train \(7 images\), "
                                       r"validation \(6 images\), test \(2 images\)"):
    imagenet.evaluation_set(d)
  d.tfds_eval_split = "test"
  with pytest.raises(ValueError, match=r"imagenet2012 test has no labels \(label -1\): .*tfds_eval_split=validation"):
    imagenet.evaluation_set(d)
  d.tfds_eval_split, d.tfds_name = "validation", "imagenet201"
  with pytest.raises(ValueError, match=r"tfds has no dataset 'imagenet201' \(did you mean 'imagenet2012'\?\)"):
    imagenet.evaluation_set(d)


def test_split_unlabeled_is_disjoint():
  from fatq import tasks

  images = np.arange(100)[:, None].astype(np.float32)
  cfg = ml_collections.ConfigDict(dict(num_train=0, num_calibration=10, num_holdout=20))
  train, cal, hold = tasks.split_unlabeled(images, cfg, seed=0)
  assert (len(train), len(cal), len(hold)) == (70, 10, 20)
  ids = [set(a.ravel().tolist()) for a in (train, cal, hold)]
  assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_image_cache_notices_a_replaced_image(tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(d / "a.png")
  first = imagenet.load_folder(d, "fat", 8, cache_dir=tmp_path / "c")
  os.utime(d / "a.png", ns=(1, 1))  # make sure the mtime differs even on coarse clocks
  Image.fromarray(np.full((20, 24, 3), 255, np.uint8)).save(d / "a.png")
  second = imagenet.load_folder(d, "fat", 8, cache_dir=tmp_path / "c")
  assert first.images.max() == -1.0 and second.images.min() == 1.0
  # replaced by a file of the same size with the same mtime (cp -p, rsync -t): its ctime tells
  Image.fromarray(np.full((20, 24, 3), 255, np.uint8)).save(d / "a.png", compress_level=0)  # uncompressed: one size
  assert imagenet.load_folder(d, "fat", 8, cache_dir=tmp_path / "c").images.min() == 1.0
  Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(tmp_path / "gray.png", compress_level=0)
  st = (d / "a.png").stat()
  assert (tmp_path / "gray.png").stat().st_size == st.st_size
  (d / "a.png").write_bytes((tmp_path / "gray.png").read_bytes())
  os.utime(d / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns))
  assert (d / "a.png").stat().st_mtime_ns == st.st_mtime_ns
  third = imagenet.load_folder(d, "fat", 8, cache_dir=tmp_path / "c")
  np.testing.assert_allclose(third.images, 128 / 127.5 - 1, atol=1e-6)


def test_crop0875_is_central_on_a_non_square_image():
  """TF-slim's central_crop(0.875): 12.5 % off each axis of that axis's own length."""
  img = np.zeros((100, 200, 3), np.uint8)
  img[6:94, 12:188] = 255  # exactly the central 87.5 % crop (top 6, left 12) is white
  np.testing.assert_allclose(imagenet.preprocess(img, "crop0875", 22), 1.0)


def test_transparent_png_is_composited_on_white():
  import tempfile
  rgba = np.zeros((4, 4, 4), np.uint8)  # black, fully transparent
  with tempfile.TemporaryDirectory() as d:
    Image.fromarray(rgba, "RGBA").save(os.path.join(d, "t.png"))
    np.testing.assert_array_equal(imagenet.load_rgb(os.path.join(d, "t.png")), 255)
    # one colour transparent (a tRNS chunk) in an RGB and a grayscale PNG: black on white, the rest kept
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0] = 200
    Image.fromarray(rgb).save(os.path.join(d, "trns_rgb.png"), transparency=(0, 0, 0))
    Image.fromarray(rgb[..., 0]).save(os.path.join(d, "trns_l.png"), transparency=0)
    for name in ("trns_rgb.png", "trns_l.png"):
      got = imagenet.load_rgb(os.path.join(d, name))
      np.testing.assert_array_equal(got[1:], 255)
      np.testing.assert_array_equal(got[0], 200)


def test_label_file_mistakes_are_named_with_their_line(tmp_path):
  d = tmp_path / "val"
  _images(d, ["a/x.png", "y.png"])
  for text, error in (
      ("a/x.png, 1\ny.png, -1\n", r"labels.txt:2: label -1 of y.png: labels are 0-based class indices"),
      ("a/x.png, 1\ny.png, 3000000001\n", r"labels.txt:2: label 3000000001 of y.png: labels are 0-based"),
      ("a/x.png, 133\nx.png, 7\ny.png, 1\n", r"labels a/x.png 133 by its path and 7 by its name 'x.png': keep one "
                                              "line per image")):
    (d / "labels.txt").write_text(text)
    with pytest.raises(ValueError, match=error):
      imagenet.load_folder(d, "fat", 8, d / "labels.txt", cache_dir=tmp_path / "c")
  (d / "labels.txt").write_bytes("a/x.png, 1\ny.png, 2 # caf\u00e9\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"labels.txt:2: not UTF-8 text .*: save the label file as UTF-8"):
    imagenet.load_folder(d, "fat", 8, d / "labels.txt", cache_dir=tmp_path / "c")
  (d / "labels.txt").write_text("a/x.png, 133\nx.png, 133\ny.png, 1\n")  # the same label twice: no harm
  np.testing.assert_array_equal(imagenet.load_folder(d, "fat", 8, d / "labels.txt", cache_dir=tmp_path / "c").labels,
                                [133, 1])


def test_image_size_must_be_positive(tmp_path):
  _images(tmp_path / "val", ["a.png"])
  for size in (0, -3):
    with pytest.raises(ValueError, match=f"image_size {size}: must be a positive integer"):
      imagenet.load_folder(tmp_path / "val", "fat", size, cache_dir=tmp_path / "c")


def test_broken_symlink_is_named_and_skipped(tmp_path):
  d = tmp_path / "pool"
  _images(d, ["a.png"])
  (d / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
  with pytest.warns(UserWarning, match=r"skipping 1 broken symlink\(s\) in .*gone.jpg -> .*nowhere.jpg"):
    assert [p.name for p in imagenet.list_images(d)] == ["a.png"]


def test_shared_images_however_the_folders_are_spelled(tmp_path, monkeypatch):
  _images(tmp_path / "val", ["a.png", "b.png"])
  monkeypatch.chdir(tmp_path)
  relative = imagenet.load_folder("val", "fat", 8, cache_dir=tmp_path / "c")
  absolute = imagenet.load_folder(tmp_path / "val", "fat", 8, cache_dir=tmp_path / "c")
  assert imagenet.shared_images(relative, absolute) == relative.files


def test_cache_dir_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  _images(tmp_path / "val", ["a.png"])
  imagenet.load_folder(tmp_path / "val", "fat", 8, cache_dir="~/fatq_cache")
  assert list((tmp_path / "home" / "fatq_cache").glob("*.npy")) and not (tmp_path / "~").exists()
