"""cnnjax.data.load_splits, the one call from ``config.data`` to train / val / test splits: the same rules
(class selection, validation hold-out, per-class subsampling, padding) for every source in every mode, and
the trainer asks the data package for nothing else."""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest
from PIL import Image

import cnnjax
from cnnjax import data
from cnnjax.data.config_splits import DataSplits, load_splits
from cnnjax.data.stream import ArraySource, FileSource, to_arrays
from cnnjax.errors import ConfigError
from experiments.configs.base import base_config
from tests.helpers import override
from tests.helpers import write_idx_dir as _idx_dir

SPLITS = ("train", "val", "test")


def _config(**dotted):
    c = base_config()
    c.data.cache_dir = ""
    return override(c, **dotted)


def _arrays(splits: DataSplits) -> dict:
    """Each split decoded: ``{split: (images [N, H, W, C], labels [N])}``."""
    return {k: (to_arrays(getattr(splits, k)).images, getattr(splits, k).labels) for k in SPLITS}


def _assert_same(a: DataSplits, b: DataSplits):
    assert (a.name, a.class_names, a.image_shape) == (b.name, b.class_names, b.image_shape)
    for k, (images, labels) in _arrays(a).items():
        np.testing.assert_array_equal(images, _arrays(b)[k][0], err_msg=k)
        np.testing.assert_array_equal(labels, _arrays(b)[k][1], err_msg=k)


def test_the_package_and_the_trainer_share_one_entry_point():
    from cnnjax.train import budget, ensemble, experiment, loop

    assert data.load_splits is load_splits and data.DataSplits is DataSplits
    assert loop.load_splits is load_splits and ensemble.load_splits is load_splits
    assert budget.DataSplits is DataSplits and experiment.DataSplits is DataSplits
    moved = {"load_data", "splits_of", "prepare_images", "select_classes", "subsample_per_class", "MODES",
             "TFDS_STREAMABLE", "_folder_splits", "_tfds_splits", "_narrow", "_class_remap", "_relabel"}
    defined = {n.name for n in ast.parse(open(experiment.__file__).read()).body
               if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert not moved & defined  # every data rule lives under cnnjax/data/


def test_no_module_imports_a_private_name_of_the_data_package():
    root = os.path.dirname(cnnjax.__file__)
    reached = []
    for folder, _, files in os.walk(root):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnnjax.data"):
                    reached += [f"{path}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not reached


def test_idx_source_resident_and_streamed(tmp_path):
    """An IDX dataset: a stratified 10% validation split held out of train, test as stored, padded to 32;
    ``stream`` gives the same examples as ``resident``."""
    ref = _idx_dir(tmp_path / "idx", n_train=40, n_test=7)
    base = {"data.name": "mnist", "data.dir": str(tmp_path / "idx"), "data.pad_to": 32}
    resident = load_splits(_config(**base))
    assert not resident.streamed and resident.name == "mnist" and resident.num_classes == 10
    assert all(isinstance(getattr(resident, k), ArraySource) for k in SPLITS)
    assert resident.image_shape == (32, 32, 1) and resident.train.images.dtype == np.uint8
    assert len(resident.train) + len(resident.val) == 40 and len(resident.val) >= 1
    assert len(resident.test) == 7
    np.testing.assert_array_equal(resident.test.images[:, 2:30, 2:30, 0], ref["t10k-images-idx3-ubyte"])
    assert not resident.test.images[:, :2].any() and not resident.test.images[:, 30:].any()  # zero margins
    held = sorted(map(int, np.concatenate([resident.train.labels, resident.val.labels])))
    assert held == sorted(map(int, ref["train-labels-idx1-ubyte"]))
    streamed = load_splits(_config(**base, **{"data.mode": "stream"}))
    assert streamed.streamed
    _assert_same(resident, streamed)


def test_idx_source_classes_and_per_class_subsampling(tmp_path):
    ref = _idx_dir(tmp_path / "idx", n_train=60, n_test=20)
    present = np.unique(ref["train-labels-idx1-ubyte"])
    classes = (int(present[2]), int(present[0]))
    splits = load_splits(_config(**{"data.name": "mnist", "data.dir": str(tmp_path / "idx"),
                                    "data.classes": classes, "data.train_per_class": 1}))
    assert splits.class_names == tuple(str(c) for c in classes)
    assert [int((splits.train.labels == c).sum()) for c in (0, 1)] == [1, 1]
    test = ref["t10k-labels-idx1-ubyte"]
    assert len(splits.test) == int(np.isin(test, classes).sum()) and set(splits.test.labels) <= {0, 1}
    with pytest.raises(ConfigError, match="data.classes"):
        load_splits(_config(**{"data.name": "mnist", "data.dir": str(tmp_path / "idx"), "data.classes": (3, 3)}))


@pytest.fixture
def folder(tmp_path):
    """An image folder: 3 classes x 8 PNG images of different sizes, 2 of them RGB."""
    rng = np.random.RandomState(0)
    for c in range(3):
        os.makedirs(tmp_path / "imgs" / f"class{c}")
        for i in range(8):
            shape = (10 + i, 12, 3) if i < 2 else (12, 10 + i)
            Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8)).save(tmp_path / "imgs" / f"class{c}"
                                                                              / f"{i}.png")
    return str(tmp_path / "imgs")


def test_folder_source_resident_streamed_and_auto(folder):
    base = {"data.name": "folder", "data.dir": folder, "data.image_size": 8, "data.channels": 1,
            "data.split_fractions": (0.5, 0.25, 0.25)}
    resident = load_splits(_config(**base))
    streamed = load_splits(_config(**base, **{"data.mode": "stream"}))
    assert not resident.streamed and streamed.streamed
    assert all(isinstance(getattr(streamed, k), FileSource) for k in SPLITS)
    assert resident.class_names == ("class0", "class1", "class2") and resident.image_shape == (8, 8, 1)
    assert (len(resident.train), len(resident.val), len(resident.test)) == (12, 6, 6)
    _assert_same(resident, streamed)
    assert load_splits(_config(**base, **{"data.mode": "auto", "data.resident_max_gb": 1e-9})).streamed
    assert not load_splits(_config(**base, **{"data.mode": "auto"})).streamed
    narrowed = {m: load_splits(_config(**base, **{"data.mode": m, "data.classes": (2, 0), "data.train_per_class": 2}))
                for m in ("resident", "stream")}
    assert narrowed["stream"].class_names == ("class2", "class0") and len(narrowed["stream"].train) == 4
    _assert_same(narrowed["resident"], narrowed["stream"])
    with pytest.raises(ConfigError, match="data.mode"):
        load_splits(_config(**base, **{"data.mode": "lazy"}))
    with pytest.raises(ConfigError, match="data.image_size"):
        load_splits(_config(**{**base, "data.image_size": 0}))


def test_tfds_auto_mode_streams_what_exceeds_the_budget(tmp_path):
    """``auto`` sizes a prepared TFDS training split from its dataset info: over budget it streams from
    ``tfds.data_source``, within it loads into memory; both hold out the same validation split."""
    from tests.test_data_sources import _prepare_tfds

    rng = np.random.RandomState(0)
    labels = np.arange(30) % 3
    _prepare_tfds(tmp_path / "tfds", "mnist", {
        "train": (rng.randint(0, 256, (30, 28, 28, 1)).astype(np.uint8), labels),
        "test": (rng.randint(0, 256, (6, 28, 28, 1)).astype(np.uint8), labels[:6])})
    base = {"data.name": "mnist", "data.tfds_data_dir": str(tmp_path / "tfds"), "data.mode": "auto",
            "data.classes": (2, 0), "data.val_fraction": 0.2}
    streamed = load_splits(_config(**base, **{"data.resident_max_gb": 1e-9}))
    resident = load_splits(_config(**base))
    assert streamed.streamed and type(streamed.train).__name__ == "TFDSSource"
    assert not resident.streamed and streamed.class_names == ("2", "0")
    assert (len(streamed.train), len(streamed.val), len(streamed.test)) == (16, 4, 4)
    _assert_same(resident, streamed)
