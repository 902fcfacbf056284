"""ImageNet-style folders: decoding odd images, corrupt files, labels, preprocessing and the cache."""

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
