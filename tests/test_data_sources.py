"""cnnjax.data sources: IDX and CIFAR raw files written here in the real formats, the synthetic stripes, the
npz cache, real Fashion-MNIST (Debian's dataset-fashion-mnist) and TFDS (mocked, and a real prepared
ArrayRecord dataset written here without TensorFlow)."""

import gzip
import io
import os
import pickle
import struct
import sys
import time

import numpy as np
import pytest

from cnnjax import data
from cnnjax.data import sources
from cnnjax.data.sources import DataFormatError, TFDSUnavailableError
from experiments.cli import as_flags
from tests.helpers import write_idx as _write_idx
from tests.helpers import write_idx_dir as _idx_dir

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                         reason="apt-get install dataset-fashion-mnist")


# ----------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loads_exact_arrays(tmp_path, gz):
    ref = _idx_dir(tmp_path, gz=gz)
    ds = data.load("mnist", data_dir=str(tmp_path))
    assert ds.train_images.shape == (5, 28, 28, 1) and ds.test_images.shape == (3, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images[..., 0], ref["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels, ref["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_images[..., 0], ref["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels, ref["t10k-labels-idx1-ubyte"])
    assert ds.name == "mnist" and ds.class_names == tuple("0123456789")
    assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)


def test_idx_fashion_mnist_class_names(tmp_path):
    _idx_dir(tmp_path)
    ds = data.load("fashion_mnist", data_dir=str(tmp_path))
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot" and ds.num_classes == 10


def test_idx_bad_magic(tmp_path):
    _idx_dir(tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), 2049)  # a labels magic
    with pytest.raises(DataFormatError, match=r"magic number 2049, expected 2051"):
        data.load("mnist", data_dir=str(tmp_path))


def test_idx_count_mismatch(tmp_path):
    _idx_dir(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4), 2049)
    with pytest.raises(DataFormatError, match=r"5 images .* but 4 labels"):
        data.load("mnist", data_dir=str(tmp_path))


def test_idx_truncated_data(tmp_path):
    _idx_dir(tmp_path)
    raw = struct.pack(">IIII", 2051, 5, 28, 28) + bytes(100)  # header says 5 images, data has 100 bytes
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    with pytest.raises(DataFormatError, match=r"\(5, 28, 28\) \(3920 bytes\) but the file has 100"):
        data.load("mnist", data_dir=str(tmp_path))


def test_idx_label_out_of_range(tmp_path):
    _idx_dir(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 10, 3]), 2049)
    with pytest.raises(DataFormatError, match=r"labels span \[0, 10\]"):
        data.load("mnist", data_dir=str(tmp_path))


def test_idx_missing_dir_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion_mnist", data_dir=str(tmp_path / "nope"))
    msg = as_flags(str(info.value))  # as the CLIs print it
    assert "\n" not in msg and "directory does not exist" in msg and "train-images-idx3-ubyte.gz" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--config.data.dir=/usr/share/datasets/fashion-mnist" in msg


def test_idx_missing_file_is_named(tmp_path):
    _idx_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\.gz\)"):
        data.load("mnist", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------------- CIFAR


def _hwc_images(n, offset):
    """Images whose every (n, h, w, c) has a distinct-enough value to catch any transpose mistake."""
    n_, h, w, c = np.meshgrid(np.arange(n), np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((offset + n_ * 11 + h * 3 + w * 5 + c * 70) % 256).astype(np.uint8)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _batch(images, label_key, labels, extra=None):
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # CHW rows, as in the real files
    return {b"data": rows, label_key: list(labels), b"filenames": [b"x.png"] * len(images), **(extra or {})}


def _cifar10_dir(root):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train = [_hwc_images(2, 20 * i) for i in range(5)]
    labels = [[2 * i, 2 * i + 1] for i in range(5)]
    for i in range(5):
        _dump(d / f"data_batch_{i + 1}", _batch(train[i], b"labels", labels[i], {b"batch_label": b"training batch"}))
    test = _hwc_images(3, 200)
    _dump(d / "test_batch", _batch(test, b"labels", [9, 0, 4]))
    _dump(d / "batches.meta", {b"label_names": [n.encode() for n in sources.CLASS_NAMES["cifar10"]]})
    return d, np.concatenate(train), np.concatenate(labels), test, np.array([9, 0, 4])


@pytest.mark.parametrize("via", ["parent", "batches_dir"])
def test_cifar10_batches(tmp_path, via):
    d, train, train_labels, test, test_labels = _cifar10_dir(tmp_path)
    ds = data.load("cifar10", data_dir=str(tmp_path if via == "parent" else d))
    assert ds.train_images.shape == (10, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images, train)
    np.testing.assert_array_equal(ds.train_labels, train_labels)
    np.testing.assert_array_equal(ds.test_images, test)
    np.testing.assert_array_equal(ds.test_labels, test_labels)
    # The raw row is channel-major: row[c * 1024 + h * 32 + w] is pixel (h, w) of channel c.
    row = pickle.load(open(d / "data_batch_1", "rb"))[b"data"][1]
    for h, w, c in [(0, 1, 0), (1, 0, 0), (0, 0, 1), (31, 7, 2)]:
        assert ds.train_images[1, h, w, c] == row[c * 1024 + h * 32 + w]
    assert ds.class_names == sources.CLASS_NAMES["cifar10"] and ds.image_shape == (32, 32, 3)


@pytest.mark.parametrize("via", ["parent", "batches_dir"])
def test_cifar100_batches(tmp_path, via):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    names = [f"fine{i:02d}" for i in range(100)]
    train, test = _hwc_images(4, 1), _hwc_images(2, 99)
    _dump(d / "train", _batch(train, b"fine_labels", [99, 0, 42, 7], {b"coarse_labels": [1, 2, 3, 4]}))
    _dump(d / "test", _batch(test, b"fine_labels", [5, 64], {b"coarse_labels": [0, 19]}))
    _dump(d / "meta", {b"fine_label_names": [n.encode() for n in names],
                       b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    ds = data.load("cifar100", data_dir=str(tmp_path if via == "parent" else d))
    np.testing.assert_array_equal(ds.train_images, train)
    np.testing.assert_array_equal(ds.test_images, test)
    np.testing.assert_array_equal(ds.train_labels, [99, 0, 42, 7])
    np.testing.assert_array_equal(ds.test_labels, [5, 64])
    assert ds.class_names == tuple(names) and ds.num_classes == 100


def test_cifar_missing_dir_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load("cifar10", data_dir=str(tmp_path))
    msg = as_flags(str(info.value))  # as the CLIs print it
    assert "\n" not in msg and "data_batch_1" in msg and "cifar-10-batches-py" in msg
    assert "--config.data.dir=" in msg and "cifar-10-python.tar.gz" in msg


def test_cifar_bad_batch(tmp_path):
    d, *_ = _cifar10_dir(tmp_path)
    _dump(d / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(DataFormatError, match="expected keys b'data' and b'labels'"):
        data.load("cifar10", data_dir=str(d))
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="cannot unpickle"):
        data.load("cifar10", data_dir=str(d))


# ----------------------------------------------------------------------------------------------- stripes


def test_stripes():
    a, b = data.load("stripes"), data.load("stripes")
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.train_images.shape == (320, 8, 8, 1) and a.test_images.shape == (80, 8, 8, 1)
    assert a.train_images.dtype == np.uint8 and a.train_labels.dtype == np.int32
    assert np.bincount(a.train_labels).tolist() == [160, 160] and np.bincount(a.test_labels).tolist() == [40, 40]
    np.testing.assert_array_equal(a.train_labels[:4], [0, 1, 0, 1])
    assert a.class_names == ("vertical", "horizontal") and a.image_shape == (8, 8, 1)
    x = a.train_images[..., 0].astype(np.float64)
    vert, horiz = x[a.train_labels == 0], x[a.train_labels == 1]
    # background ~ (0 + 1) * 85 = 85, stripe ~ (1 + 1) * 85 = 170
    assert vert[:, :, 3:5].mean() > 160 and np.delete(vert, [3, 4], axis=2).mean() < 95
    assert horiz[:, 3:5, :].mean() > 160 and np.delete(horiz, [3, 4], axis=1).mean() < 95
    # first value by hand: RandomState(0).randn() = 1.764..., *0.2 = 0.3528 (no stripe at (0,0)) -> 115
    assert a.train_images[0, 0, 0, 0] == round((0.2 * np.random.RandomState(0).randn() + 1.0) * 255 / 3)


def test_stripes_mean_std_constants_match_data():
    x = data.load("stripes").train_images / 255.0
    (mean,), (std,) = data.MEAN_STD["stripes"]
    assert abs(x.mean() - mean) < 1e-4 and abs(x.std() - std) < 1e-4


def test_mean_std_table():
    assert set(data.MEAN_STD) == set(data.DATASETS)
    assert data.MEAN_STD["mnist"] == ((0.1307,), (0.3081,))
    for name, (mean, std) in data.MEAN_STD.items():
        assert len(mean) == len(std) == (3 if name.startswith("cifar") else 1)


def test_unknown_name_and_bad_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        data.load("svhn")
    x = np.zeros((3, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="labels"):
        data.Dataset("x", x, np.zeros(2, np.int32), x, np.zeros(3, np.int32), ("a",))


# ----------------------------------------------------------------------------------------------- cache


def _cache_files(cache_dir):
    return sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []


def test_cache_is_read_back(tmp_path, monkeypatch):
    src, cache = tmp_path / "idx", tmp_path / "cache"
    _idx_dir(src)
    first = data.load("mnist", data_dir=str(src), cache_dir=str(cache))
    assert len(_cache_files(cache)) == 1 and _cache_files(cache)[0].endswith(".npz")

    def boom(*a, **k):
        raise AssertionError("the raw files were parsed again")

    monkeypatch.setattr(sources, "_load_idx", boom)
    second = data.load("mnist", data_dir=str(src), cache_dir=str(cache))
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
        assert getattr(first, field).dtype == getattr(second, field).dtype
    assert second.class_names == first.class_names and second.name == "mnist"


def test_cache_follows_changed_source_files(tmp_path):
    src, cache = tmp_path / "idx", tmp_path / "cache"
    _idx_dir(src, seed=0)
    a = data.load("mnist", data_dir=str(src), cache_dir=str(cache))
    ref = _idx_dir(src, n_train=6, seed=1)
    b = data.load("mnist", data_dir=str(src), cache_dir=str(cache))
    assert len(a.train_images) == 5 and len(b.train_images) == 6
    np.testing.assert_array_equal(b.train_images[..., 0], ref["train-images-idx3-ubyte"])


def test_cache_write_failure_leaves_no_file(tmp_path, monkeypatch):
    src, cache = tmp_path / "idx", tmp_path / "cache"
    _idx_dir(src)

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half an npz")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.warns(UserWarning, match="could not write cache"):
        ds = data.load("mnist", data_dir=str(src), cache_dir=str(cache))
    assert len(ds.train_images) == 5 and _cache_files(cache) == []

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 half an npz")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load("mnist", data_dir=str(src), cache_dir=str(cache))
    assert _cache_files(cache) == []


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "missing_keys", "wrong_dtype"])
def test_corrupt_cache_is_rebuilt(tmp_path, corruption):
    src, cache = tmp_path / "idx", tmp_path / "cache"
    ref = _idx_dir(src)
    data.load("mnist", data_dir=str(src), cache_dir=str(cache))
    (name,) = _cache_files(cache)
    path = cache / name
    if corruption == "garbage":
        path.write_bytes(b"\x00not an npz at all")
    elif corruption == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif corruption == "missing_keys":
        np.savez(path, train_images=np.zeros((1, 28, 28, 1), np.uint8))
    else:
        z = dict(np.load(path))
        z["train_labels"] = z["train_labels"].astype(np.int64)
        np.savez(path, **z)
    with pytest.warns(UserWarning, match="rebuilding unreadable cache"):
        ds = data.load("mnist", data_dir=str(src), cache_dir=str(cache))
    np.testing.assert_array_equal(ds.train_images[..., 0], ref["train-images-idx3-ubyte"])
    assert _cache_files(cache) == [name]
    with np.load(path) as z:  # rewritten whole
        np.testing.assert_array_equal(z["test_labels"], ref["t10k-labels-idx1-ubyte"])


def test_stripes_ignores_cache_dir(tmp_path):
    data.load("stripes", cache_dir=str(tmp_path / "cache"))
    assert _cache_files(tmp_path / "cache") == []


# ----------------------------------------------------------------------------------------------- real Fashion-MNIST


@needs_fashion_mnist
def test_real_fashion_mnist_and_fast_cache(tmp_path):
    ds = data.load("fashion_mnist", data_dir=FASHION_MNIST_DIR, cache_dir=str(tmp_path))
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    (mean,), (std,) = data.MEAN_STD["fashion_mnist"]
    x = ds.train_images / np.float32(255)
    assert abs(x.mean() - mean) < 1e-4 and abs(x.std() - std) < 1e-4
    start = time.perf_counter()
    again = data.load("fashion_mnist", data_dir=FASHION_MNIST_DIR, cache_dir=str(tmp_path))
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"cached Fashion-MNIST load took {elapsed:.2f} s"
    np.testing.assert_array_equal(again.train_images, ds.train_images)
    np.testing.assert_array_equal(again.test_labels, ds.test_labels)


# ----------------------------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                        ("cifar100", (32, 32, 3))])
def test_tfds_mock_data(tmp_path, name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        ds = data.load(name, tfds_data_dir=str(tmp_path))
    assert ds.name == name
    assert ds.train_images.shape == (4, *shape) and ds.test_images.shape == (4, *shape)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.shape == (4,)
    assert ds.num_classes == (100 if name == "cifar100" else 10)
    assert 0 <= ds.train_labels.min() and ds.train_labels.max() < ds.num_classes
    assert ds.train_images.std() > 0  # random data, not zeros


def _prepare_tfds(data_dir, name, splits):
    """Write a prepared ArrayRecord TFDS dataset as download_and_prepare would, but without TensorFlow:
    PNG-encode with PIL, serialise tf.Example with TFDS's own protos, write dataset_info.json/features.json."""
    tfds = pytest.importorskip("tensorflow_datasets")
    Image = pytest.importorskip("PIL.Image")
    arm = pytest.importorskip("array_record.python.array_record_module")
    from tensorflow_datasets.core import example_serializer

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    serializer = example_serializer.ExampleSerializer(builder.info.features.get_serialized_info())
    builder.data_path.mkdir(parents=True, exist_ok=True)
    infos = []
    for split, (images, labels) in splits.items():
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=name, split=split, filetype_suffix="array_record")
        writer = arm.ArrayRecordWriter(os.fspath(template.sharded_filepaths(1)[0]), "group_size:1")
        num_bytes = 0
        for image, label in zip(images, labels, strict=True):
            png = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
            record = serializer.serialize_example({"image": png.getvalue(), "label": int(label)})
            num_bytes += len(record)
            writer.write(record)
        writer.close()
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(images)], num_bytes=num_bytes,
                                         filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_path)


def test_tfds_prepared_array_record_dataset_without_tensorflow(tmp_path):
    rng = np.random.RandomState(0)
    train = rng.randint(0, 256, (6, 28, 28, 1)).astype(np.uint8), np.array([3, 1, 4, 1, 5, 9])
    test = rng.randint(0, 256, (2, 28, 28, 1)).astype(np.uint8), np.array([2, 6])
    _prepare_tfds(tmp_path / "tfds", "mnist", {"train": train, "test": test})
    ds = data.load("mnist", tfds_data_dir=str(tmp_path / "tfds"), cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(ds.train_images, train[0])
    np.testing.assert_array_equal(ds.train_labels, train[1])
    np.testing.assert_array_equal(ds.test_images, test[0])
    np.testing.assert_array_equal(ds.test_labels, test[1])
    assert ds.train_labels.dtype == np.int32 and ds.class_names == tuple("0123456789")
    assert len(_cache_files(tmp_path / "cache")) == 1
    cached = data.load("mnist", tfds_data_dir=str(tmp_path / "tfds"), cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(cached.train_images, train[0])


def test_tfds_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes `import tensorflow_datasets` fail
    with pytest.raises(TFDSUnavailableError) as info:
        data.load("cifar10")
    msg = as_flags(str(info.value))  # as the CLIs print it
    assert "\n" not in msg and "tensorflow_datasets is not installed" in msg
    assert "pip install tensorflow tensorflow-datasets" in msg
    assert "--config.data.dir=<dir with cifar-10-batches-py>" in msg


def test_tfds_unprepared_without_tensorflow_fails_fast(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(sources, "_tensorflow_installed", lambda: False)
    start = time.perf_counter()
    with pytest.raises(TFDSUnavailableError) as info:
        data.load("fashion_mnist", tfds_data_dir=str(tmp_path / "empty"))
    assert time.perf_counter() - start < 20  # no download attempt
    msg = as_flags(str(info.value))  # as the CLIs print it
    assert "\n" not in msg and str(tmp_path / "empty") in msg
    assert "not prepared there and preparing it needs TensorFlow, which is not installed" in msg
    assert "run once online" in msg and "--config.data.dir=<dir with the four IDX files>" in msg


def test_tfds_prepare_failure_is_reported(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []

    def fake_data_source(name, split=None, data_dir=None, download=True, **kwargs):
        calls.append(download)
        if not download:
            raise NotImplementedError("Random access data source for file format FileFormat.TFRECORD")
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'\nmore lines")

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    monkeypatch.setattr(sources, "_tensorflow_installed", lambda: True)
    with pytest.raises(TFDSUnavailableError) as info:
        data.load("mnist", tfds_data_dir=str(tmp_path))
    assert calls == [False, True]  # tried the prepared data, then the real download-and-prepare path
    msg = as_flags(str(info.value))  # as the CLIs print it
    assert "\n" not in msg and "not prepared there and downloading and preparing it failed" in msg
    assert "ConnectionError: Failed to resolve" in msg and isinstance(info.value.__cause__, ConnectionError)
