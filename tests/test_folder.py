"""cnnjax.data.folder: ImageFolder and pre-split layouts, the stratified split, Pillow decoding of every image
mode (EXIF rotation, alpha, palette, 16-bit, CMYK), resize + centre crop, bad files, and
experiments.export_folder writing real Fashion-MNIST images."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from cnnjax.data import folder
from cnnjax.data.folder import FolderSplits, decode_files, decode_image, scan_folder
from cnnjax.data.sources import DataFormatError
from cnnjax.errors import ConfigError
from experiments.cli import as_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                         reason="apt-get install dataset-fashion-mnist")


def _png(path, value=0, size=(4, 4), mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value).save(path)
    return str(path)


def _tree(root, counts):
    """``root/<class>/img_<i>.png`` for ``{class: n}``; returns ``{class: [abs paths]}``."""
    return {name: [os.path.abspath(_png(os.path.join(root, name, f"img_{i:03d}.png"), i)) for i in range(n)]
            for name, n in counts.items()}


def _check_disjoint_cover(splits: FolderSplits, files: dict):
    parts = [splits.train, splits.val, splits.test]
    paths = [p for part in parts for p, _ in part]
    assert len(paths) == len(set(paths)), "a file is in two splits"
    assert sorted(paths) == sorted(p for ps in files.values() for p in ps)
    for part in parts:
        assert list(part) == sorted(part, key=lambda item: (item[1], item[0]))
        for path, label in part:
            assert os.path.isabs(path)
            assert os.path.basename(os.path.dirname(path)) == splits.class_names[label]


# ----------------------------------------------------------------------------------------------- scanning


def test_imagefolder_split_is_stratified_deterministic_and_seeded(tmp_path):
    names = ["zebra", "Apple", "cat", "_under", "bird"]
    files = _tree(tmp_path, dict.fromkeys(names, 20))
    splits = scan_folder(str(tmp_path))
    assert splits.class_names == ("Apple", "_under", "bird", "cat", "zebra")  # Python string order
    assert not splits.presplit
    for label in range(5):
        counts = [sum(lab == label for _, lab in part) for part in (splits.train, splits.val, splits.test)]
        assert counts == [14, 3, 3]
    _check_disjoint_cover(splits, files)
    # the documented recipe: class c's sorted files permuted by default_rng([seed, c]); val first, then test
    for label, name in enumerate(splits.class_names):
        order = np.random.default_rng([0, label]).permutation(20)
        assert [p for p, lab in splits.val if lab == label] == sorted(files[name][i] for i in order[:3])
        assert [p for p, lab in splits.test if lab == label] == sorted(files[name][i] for i in order[3:6])
    assert scan_folder(str(tmp_path)) == splits
    other = scan_folder(str(tmp_path), seed=1)
    assert other.val != splits.val and other.test != splits.test
    assert [len(p) for p in (other.train, other.val, other.test)] == [70, 15, 15]


def test_split_ignores_directory_listing_order(tmp_path, monkeypatch):
    _tree(tmp_path, {"a": 9, "b": 7})
    want = scan_folder(str(tmp_path), (0.5, 0.25, 0.25), seed=3)
    real_scandir = os.scandir

    class ReversedScandir:  # os.walk and scan_folder both list directories through os.scandir
        def __init__(self, path="."):
            with real_scandir(path) as entries:
                self.entries = sorted(entries, key=lambda e: e.name, reverse=True)

        def __iter__(self):
            return self

        def __next__(self):
            if not self.entries:
                raise StopIteration
            return self.entries.pop(0)

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", ReversedScandir)
    assert next(os.walk(tmp_path / "a"))[2] == [f"img_{i:03d}.png" for i in range(8, -1, -1)]
    assert scan_folder(str(tmp_path), (0.5, 0.25, 0.25), seed=3) == want


def test_nested_files_extensions_and_hidden_entries(tmp_path):
    keep = [_png(tmp_path / "dog" / "a.png"), _png(tmp_path / "dog" / "deep" / "er" / "b.PNG"),
            _png(tmp_path / "dog" / "c.JPEG", mode="RGB")]
    Image.new("RGB", (4, 4)).save(tmp_path / "dog" / "d.webp")
    keep.append(str(tmp_path / "dog" / "d.webp"))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    _png(tmp_path / "dog" / "._a.png")  # macOS AppleDouble file
    _png(tmp_path / "dog" / ".ipynb_checkpoints" / "x.png")
    _png(tmp_path / ".hidden_class" / "x.png")
    _png(tmp_path / "loose.png")  # an image directly in ROOT is no class
    splits = scan_folder(str(tmp_path), (1.0, 0.0, 0.0))
    assert splits.class_names == ("dog",)
    assert sorted(p for p, _ in splits.train) == sorted(os.path.abspath(p) for p in keep)
    assert splits.val == splits.test == ()


def test_every_extension_any_case(tmp_path):
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    paths = []
    for i, ext in enumerate(folder.IMG_EXTENSIONS):
        path = tmp_path / "c" / f"img{i}{ext.upper() if i % 2 else ext}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(grey).save(path, format={".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF"}.get(ext),
                                   **({"lossless": True} if ext == ".webp" else {}))
        paths.append(str(path))
    splits = scan_folder(str(tmp_path), (1.0, 0.0, 0.0))
    assert sorted(p for p, _ in splits.train) == sorted(paths)
    images, kept = decode_files([p for p, _ in splits.train], 4, 1)
    assert kept.all()
    lossless = [i for i, (p, _) in enumerate(splits.train) if not p.lower().endswith((".jpg", ".jpeg"))]
    assert len(lossless) == 7
    for i in lossless:
        np.testing.assert_array_equal(images[i, ..., 0], grey, err_msg=splits.train[i][0])


def test_symlinked_class_directory_and_loop(tmp_path):
    _tree(tmp_path / "elsewhere", {"real": 2})
    root = tmp_path / "root"
    _tree(root, {"a": 2})
    os.symlink(tmp_path / "elsewhere" / "real", root / "linked")
    os.symlink(root / "a", root / "a" / "loop")  # a symlink loop must not hang the walk
    splits = scan_folder(str(root), (1.0, 0.0, 0.0))
    assert splits.class_names == ("a", "linked")
    assert [lab for _, lab in splits.train] == [0, 0, 1, 1]


def test_small_classes_get_at_least_one_held_out_image(tmp_path):
    _tree(tmp_path, {"one": 1, "two": 2, "three": 3, "ten": 10})
    splits = scan_folder(str(tmp_path))
    counts = {name: [sum(splits.class_names[lab] == name for _, lab in part)
                     for part in (splits.train, splits.val, splits.test)] for name in splits.class_names}
    # ten: round(1.5) = 2 (half to even), three: rounds to 0 but nonzero fractions give >= 1 each
    assert counts == {"one": [1, 0, 0], "two": [2, 0, 0], "three": [1, 1, 1], "ten": [6, 2, 2]}
    # a nonzero fraction rounding to 0 for a class of >= 3 still gives 1, keeping train >= 1
    splits = scan_folder(str(tmp_path), (0.05, 0.9, 0.05))
    assert [sum(lab == splits.class_names.index("three") for _, lab in part)
            for part in (splits.train, splits.val, splits.test)] == [1, 1, 1]
    assert all(any(lab == c for _, lab in splits.train) for c in range(4))


def test_presplit_layout_maps_split_folders(tmp_path):
    train = _tree(tmp_path / "train", {"b": 3, "a": 2})
    val = _tree(tmp_path / "val", {"a": 1, "c": 2})  # class c only in val, b missing from val
    test = _tree(tmp_path / "test", {"b": 1})
    splits = scan_folder(str(tmp_path))
    assert splits.presplit
    assert splits.class_names == ("a", "b", "c")
    assert splits.train == tuple((p, 0) for p in train["a"]) + tuple((p, 1) for p in train["b"])
    assert splits.val == tuple((p, 0) for p in val["a"]) + tuple((p, 2) for p in val["c"])
    assert splits.test == tuple((p, 1) for p in test["b"])


def test_presplit_without_val_holds_val_out_of_train(tmp_path):
    train = _tree(tmp_path / "train", {"x": 20, "y": 20})
    test = _tree(tmp_path / "test", {"x": 2, "y": 2})
    splits = scan_folder(str(tmp_path), (0.7, 0.15, 0.15))
    assert splits.presplit
    for label in (0, 1):
        assert sum(lab == label for _, lab in splits.val) == 3  # round(20 * 0.15)
        assert sum(lab == label for _, lab in splits.train) == 17
    _check_disjoint_cover(FolderSplits(splits.class_names, splits.train, splits.val, (), True), train)
    assert sorted(p for p, _ in splits.test) == sorted(test["x"] + test["y"])
    assert scan_folder(str(tmp_path), seed=5).val != splits.val

    (tmp_path / "val").mkdir()  # now val exists but test is removed: test is held out instead
    _tree(tmp_path / "val", {"x": 1})
    os.rename(tmp_path / "test", tmp_path / "old_test")
    splits = scan_folder(str(tmp_path), (0.6, 0.1, 0.3))
    assert [sum(lab == 0 for _, lab in part) for part in (splits.train, splits.val, splits.test)] == [14, 1, 6]


def test_train_val_test_folders_holding_images_are_classes(tmp_path):
    _png(tmp_path / "train" / "a.png")
    _png(tmp_path / "val" / "b.png")
    splits = scan_folder(str(tmp_path), (1.0, 0.0, 0.0))
    assert not splits.presplit and splits.class_names == ("train", "val")


def test_missing_and_empty_roots(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        scan_folder(str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    assert "--config.data.dir" in as_flags(str(info.value))
    with pytest.raises(DataFormatError, match="no class folders") as info:
        scan_folder(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    _png(tmp_path / "loose.png")
    with pytest.raises(DataFormatError, match="no class folders"):
        scan_folder(str(tmp_path))
    _png(tmp_path / "ok" / "a.png")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("x")
    with pytest.raises(DataFormatError) as info:
        scan_folder(str(tmp_path))
    assert str(tmp_path / "empty_class") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.1), (0.0, 0.5, 0.5), (0.6, -0.1, 0.5), (0.5, 0.5),
                                       (float("nan"), 0.5, 0.5)])
def test_bad_fractions(tmp_path, fractions):
    _tree(tmp_path, {"a": 3})
    with pytest.raises(ConfigError) as info:
        scan_folder(str(tmp_path), fractions)
    assert info.value.key == "data.split_fractions"


# ----------------------------------------------------------------------------------------------- decoding


def _gradient(w, h):
    """A smooth, asymmetric RGB image (no two pixels of a row or column alike)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 3 + y * 7) % 256], -1).astype(np.uint8)


def test_grey_and_rgb_channels(tmp_path):
    rgb = _gradient(8, 8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    got3 = decode_image(str(tmp_path / "rgb.png"), 8, 3)
    got1 = decode_image(str(tmp_path / "rgb.png"), 8, 1)
    assert got3.dtype == np.uint8 and got3.shape == (8, 8, 3)
    np.testing.assert_array_equal(got3, rgb)
    np.testing.assert_array_equal(got1[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "grey.png"), 8, 1), grey[..., None])
    np.testing.assert_array_equal(decode_image(str(tmp_path / "grey.png"), 8, 3), np.repeat(grey[..., None], 3, -1))


def test_alpha_is_dropped_not_composited(tmp_path):
    rgb = _gradient(6, 6)
    alpha = np.zeros((6, 6), np.uint8)  # fully transparent: compositing onto black would give zeros
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "rgba.png"), 6), rgb)
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "la.png"), 6, 1)[..., 0], rgb[..., 0])


def test_palette_images_with_and_without_transparency(tmp_path):
    palette = np.arange(256 * 3, dtype=np.uint8).reshape(256, 3)[::-1].copy()
    index = (np.arange(36).reshape(6, 6) * 7 % 256).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.ravel().tolist())
    want = palette[index]
    img.save(tmp_path / "p.png")
    img.save(tmp_path / "p_trns.png", transparency=int(index[0, 0]))  # one transparent index
    img.save(tmp_path / "p_trns_bytes.png", transparency=bytes([0, 128] + [255] * 254))  # alpha per entry
    img.save(tmp_path / "p.gif")
    for name in ("p.png", "p_trns.png", "p_trns_bytes.png", "p.gif"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = decode_image(str(tmp_path / name), 6)
        np.testing.assert_array_equal(got, want, err_msg=name)
    with Image.open(tmp_path / "p_trns_bytes.png") as check:
        assert check.mode == "P" and isinstance(check.info["transparency"], bytes)


def test_bilevel_image(tmp_path):
    bits = (np.indices((5, 5)).sum(0) % 2).astype(bool)
    Image.fromarray(bits).save(tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as check:
        assert check.mode == "1"
    np.testing.assert_array_equal(decode_image(str(tmp_path / "one.png"), 5, 1)[..., 0], bits * np.uint8(255))


def test_16_and_32_bit_and_float_images_scale_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 128, 65534], [129, 385, 386]], np.uint16)
    want = np.array([[0, 1, 128], [255, 0, 255], [1, 1, 2]], np.uint8)  # round(v / 257)
    Image.fromarray(values).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as check:
        assert check.mode == "I;16"
    np.testing.assert_array_equal(decode_image(str(tmp_path / "i16.png"), 3, 1)[..., 0], want)
    np.testing.assert_array_equal(decode_image(str(tmp_path / "i16.png"), 3, 3), np.repeat(want[..., None], 3, -1))

    big_endian = Image.new("I;16B", (3, 3))
    big_endian.frombytes(values.astype(">u2").tobytes())
    big_endian.save(tmp_path / "i16b.tif")
    with Image.open(tmp_path / "i16b.tif") as check:
        assert check.mode == "I;16B"
    np.testing.assert_array_equal(decode_image(str(tmp_path / "i16b.tif"), 3, 1)[..., 0], want)

    int32 = np.array([[-5, 70000, 65535], [25700, 0, 129], [1 << 30, -(1 << 30), 257]], np.int32)
    Image.fromarray(int32, "I").save(tmp_path / "i32.tif")
    with Image.open(tmp_path / "i32.tif") as check:
        assert check.mode == "I"
    np.testing.assert_array_equal(decode_image(str(tmp_path / "i32.tif"), 3, 1)[..., 0],
                                  [[0, 255, 255], [100, 0, 1], [255, 0, 1]])

    floats = np.array([[-3.0, 300.0, 12.4], [12.6, 0.0, 255.0], [254.6, 1.2, 99.0]], np.float32)
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "f.tif"), 3, 1)[..., 0],
                                  [[0, 255, 12], [13, 0, 255], [255, 1, 99]])


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)  # pure cyan
    with Image.open(tmp_path / "cyan.jpg") as check:
        assert check.mode == "CMYK"
    got = decode_image(str(tmp_path / "cyan.jpg"), 8)
    assert got.shape == (8, 8, 3)
    assert np.abs(got.astype(int) - [0, 255, 255]).max() <= 3


@pytest.mark.parametrize("orientation,rotate", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
                                                (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    stored = Image.fromarray(_gradient(30, 20))  # landscape as stored; displayed portrait for 6 and 8
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "rotated.jpg") as raw:  # the stored (unrotated) JPEG pixels, rotated by hand
        raw_pixels = raw.convert("RGB")
    raw_pixels.transpose(rotate).save(tmp_path / "by_hand.png")
    raw_pixels.save(tmp_path / "unrotated.png")
    for channels in (1, 3):
        got = decode_image(str(tmp_path / "rotated.jpg"), 20, channels)
        np.testing.assert_array_equal(got, decode_image(str(tmp_path / "by_hand.png"), 20, channels))
        assert not np.array_equal(got, decode_image(str(tmp_path / "unrotated.png"), 20, channels))
    # against the original pixels (JPEG loss only): the stored image's top-left corner, rotated clockwise
    # by orientation 6, ends up at the top-right of the portrait before cropping
    want = np.asarray(stored.transpose(rotate))
    top = (want.shape[0] - 20) // 2
    left = (want.shape[1] - 20) // 2
    diff = np.abs(decode_image(str(tmp_path / "rotated.jpg"), 20).astype(int)
                  - want[top:top + 20, left:left + 20].astype(int))
    assert diff.mean() < 4


@pytest.mark.parametrize("w,h,size", [(40, 20, 10), (20, 40, 10), (41, 17, 8), (7, 13, 7), (6, 9, 12), (5, 5, 3),
                                      (101, 3, 2)])
def test_shorter_side_resize_then_centre_crop(tmp_path, w, h, size):
    rgb = _gradient(w, h)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    short = min(w, h)
    new_w, new_h = round(w * size / short), round(h * size / short)
    img = Image.fromarray(rgb)
    if short != size:
        img = img.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    want = np.asarray(img)[top:top + size, left:left + size]
    for channels in (1, 3):
        got = decode_image(str(tmp_path / "img.png"), size, channels)
        assert got.shape == (size, size, channels) and got.dtype == np.uint8
    np.testing.assert_array_equal(decode_image(str(tmp_path / "img.png"), size, 3), want)


def _truncated_jpeg(path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    return str(path)


def test_bad_files_raise_one_line_errors_or_are_skipped(tmp_path):
    good = _png(tmp_path / "good.png", 7, (5, 5))
    good2 = _png(tmp_path / "good2.png", 9, (5, 5))
    truncated = _truncated_jpeg(tmp_path / "cut.jpg")
    text = tmp_path / "text.png"
    text.write_text("this is not a PNG\nat all\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (truncated, str(text), str(empty), str(tmp_path / "gone.png")):
        with pytest.raises(DataFormatError) as info:
            decode_image(bad, 4)
        message = str(info.value)
        assert f"cannot decode image {bad}:" in message and "\n" not in message
        assert "--config.data.skip_bad_images" in as_flags(message)
    with pytest.raises(DataFormatError, match="truncated"):
        decode_image(truncated, 4)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES

    paths = [good, truncated, good2, str(text)]
    with pytest.raises(DataFormatError, match="cut.jpg"):
        decode_files(paths, 4)
    images, kept = decode_files(paths, 4, channels=1, skip_bad=True)
    assert kept.tolist() == [True, False, True, False]
    assert images.shape == (2, 4, 4, 1) and images.dtype == np.uint8
    assert images[0].max() == images[0].min() == 7 and images[1].max() == 9
    with pytest.raises(DataFormatError, match="none of the 2 images") as info:
        decode_files([truncated, str(text)], 4, skip_bad=True)
    assert "\n" not in str(info.value)
    images, kept = decode_files([], 4)
    assert images.shape == (0, 4, 4, 3) and kept.shape == (0,)
    images, kept = decode_files([good, good2], 3, 3)
    assert images.shape == (2, 3, 3, 3) and kept.all()


def test_bad_size_and_channels(tmp_path):
    good = _png(tmp_path / "good.png")
    for size in (0, -1, 2.5, True):
        with pytest.raises(ConfigError) as info:
            decode_image(good, size)
        assert info.value.key == "data.image_size"
    for channels in (0, 2, 4):
        with pytest.raises(ConfigError) as info:
            decode_files([good], 4, channels)
        assert info.value.key == "data.channels"


# ----------------------------------------------------------------------------------------------- exporter


def _export(*args):
    return subprocess.run([sys.executable, "-m", "experiments.export_folder", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@needs_fashion_mnist
def test_export_fashion_mnist_folder(tmp_path):
    out = str(tmp_path / "jpg")
    run = _export("--dataset", "fashion_mnist", "--out", out, "--classes", "0,1", "--per_class", "5",
                  "--size", "32", "--format", "jpg", "--channels", "3", "--data_dir", FASHION_MNIST_DIR)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1 and "10" in run.stdout and out in run.stdout
    splits = scan_folder(out, (1.0, 0.0, 0.0))
    assert splits.class_names == ("00_T-shirt_top", "01_Trouser")
    assert [lab for _, lab in splits.train] == [0] * 5 + [1] * 5
    assert all(p.endswith(".jpg") and os.path.basename(p).startswith("train_") for p, _ in splits.train)
    images, kept = decode_files([p for p, _ in splits.train], 32)
    assert images.shape == (10, 32, 32, 3) and kept.all() and images.std() > 10

    again = _export("--out", out, "--classes", "0", "--per_class", "1")
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and again.stderr.startswith("error:") and out in again.stderr
    assert sorted(os.listdir(out)) == ["00_T-shirt_top", "01_Trouser"]


@needs_fashion_mnist
def test_export_png_is_lossless(tmp_path):
    from cnnjax.data import load

    ds = load("fashion_mnist", data_dir=FASHION_MNIST_DIR, cache_dir=None)
    out = str(tmp_path / "png")
    run = _export("--out", out, "--classes", "Ankle boot,sandal", "--per_class", "2", "--size", "0",
                  "--format", "png", "--channels", "1", "--split", "test")
    assert run.returncode == 0, run.stderr
    splits = scan_folder(out, (1.0, 0.0, 0.0))
    assert splits.class_names == ("05_Sandal", "09_Ankle_boot")
    for label, class_index in ((0, 5), (1, 9)):
        first = np.flatnonzero(ds.test_labels == class_index)[0]
        path = [p for p, lab in splits.train if lab == label][0]
        assert os.path.basename(path) == f"test_{first:04d}.png"
        np.testing.assert_array_equal(decode_image(path, 28, 1), ds.test_images[first])
