"""cnnjax.viz: every plot writes a readable PNG atomically; bad input is a clear ValueError."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from cnnjax import viz

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RNG = np.random.default_rng(0)


def _history(n: int) -> list[dict]:
    return [dict(epoch=e, train_loss=2.0 / e, test_loss=2.1 / e, train_accuracy=1 - 0.5 / e,
                 test_accuracy=0.9 - 0.5 / e) for e in range(1, n + 1)]


def _fmaps() -> list[tuple[str, np.ndarray]]:
    return [("conv1", RNG.normal(size=(32, 32, 16))), ("pool1", RNG.normal(size=(16, 16, 16))),
            ("conv2", RNG.normal(size=(16, 16, 3)))]


# name -> (function, args before path, kwargs); each writes one PNG.
CASES = {
    "curves": (viz.plot_curves, (_history(10),), {}),
    "curves_one_epoch": (viz.plot_curves, (_history(1),), {}),
    "per_class": (viz.plot_per_class_accuracy, (np.linspace(0.5, 1.0, 10), NAMES), {"title": "CIFAR-10"}),
    "per_class_nan_default_names": (viz.plot_per_class_accuracy, (np.array([0.2, np.nan, 1.0]), None), {}),
    "confusion_normalised": (viz.plot_confusion_matrix, (RNG.integers(0, 50, (10, 10)), NAMES), {}),
    "confusion_counts_zero_row": (viz.plot_confusion_matrix, (np.array([[5, 1], [0, 0]]), ["a", "b"]),
                                  {"normalize": False}),
    "confusion_k30_no_cell_text": (viz.plot_confusion_matrix, (RNG.integers(0, 9, (30, 30)), None), {}),
    "filters_rgb": (viz.plot_filters, (RNG.normal(size=(5, 5, 3, 80)),), {"max_filters": 64}),
    "filters_gray": (viz.plot_filters, (RNG.normal(size=(3, 3, 1, 6)),), {}),
    "filters_multichannel_first": (viz.plot_filters, (RNG.normal(size=(3, 3, 16, 10)),),
                                   {"channel_reduce": "first"}),
    "feature_maps_uint8": (viz.plot_feature_maps, ((RNG.random((32, 32, 3)) * 255).astype(np.uint8), _fmaps()), {}),
    "feature_maps_float_gray": (viz.plot_feature_maps, (RNG.normal(size=(28, 28, 1)), _fmaps()[:1]),
                                {"max_channels": 4}),
    "lines_logx": (viz.plot_lines, ([1, 5, 10, 50], {"probe": [0.3, 0.5, 0.6, 0.7], "scratch": [0.1, None, 0.3, 0.5]}),
                   {"xlabel": "K", "ylabel": "accuracy", "title": "Transfer vs K", "logx": True}),
}


def _assert_png(path: str | os.PathLike) -> np.ndarray:
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape
    return image


def _call(name: str, path: str | os.PathLike) -> str:
    fn, args, kwargs = CASES[name]
    return fn(*args, path, **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_writes_valid_png_and_no_temp_files(name, tmp_path):
    path = tmp_path / f"{name}.png"
    out = _call(name, path)
    assert out == str(path)
    image = _assert_png(out)
    assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas
    assert os.listdir(tmp_path) == [path.name]


def test_accepts_str_path_creates_parent_and_overwrites(tmp_path):
    path = str(tmp_path / "nested" / "dir" / "curves.png")
    assert viz.plot_curves(_history(3), path) == path
    first = pathlib.Path(path).read_bytes()
    viz.plot_curves(_history(8), path)
    assert pathlib.Path(path).read_bytes() != first
    _assert_png(path)
    assert os.listdir(os.path.dirname(path)) == ["curves.png"]


def test_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = viz.plot_lines([1, 2], {"a": [1.0, 2.0]}, tmp_path / "l.png", "x", "y", "t")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


_ORIGINAL_PRINT_PNG = FigureCanvasAgg.print_png


def _fail_mid_write(error: Exception):
    """A print_png that writes half a PNG to its real target, then raises ``error`` (a crash mid-save).

    In-memory dry runs (matplotlib may render to a BytesIO first) are passed through.
    """

    def print_png(self, filename_or_obj, **kwargs):
        if isinstance(filename_or_obj, io.BytesIO):
            return _ORIGINAL_PRINT_PNG(self, filename_or_obj, metadata=kwargs.get("metadata"),
                                       pil_kwargs=kwargs.get("pil_kwargs"))
        if hasattr(filename_or_obj, "write"):
            filename_or_obj.write(PNG_SIGNATURE + b"partial")
        else:
            with open(filename_or_obj, "wb") as fh:
                fh.write(PNG_SIGNATURE + b"partial")
        raise error

    return print_png


@pytest.mark.parametrize("name", ["curves", "confusion_normalised", "feature_maps_uint8"])
def test_failure_during_save_leaves_nothing(name, tmp_path, monkeypatch):
    monkeypatch.setattr(FigureCanvasAgg, "print_png", _fail_mid_write(RuntimeError("disk on fire")))
    path = tmp_path / "out.png"
    with pytest.raises(RuntimeError, match="disk on fire"):
        _call(name, path)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_failure_during_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    path.write_bytes(b"previous")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", _fail_mid_write(OSError("no space left")))
    with pytest.raises(OSError, match="no space left"):
        viz.plot_curves(_history(2), path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.png"]


def test_import_does_not_touch_pyplot():
    code = "import sys, cnnjax.viz; assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


BAD = [
    (viz.plot_curves, ([],), {}, "history must be a non-empty list"),
    (viz.plot_curves, (_history(1)[0],), {}, "history must be a non-empty list"),
    (viz.plot_curves, ([{"epoch": 1, "train_loss": 1.0}],), {}, r"history\[0\] is missing key\(s\) test_loss"),
    (viz.plot_curves, ([3.0],), {}, r"history\[0\] must be a dict"),
    (viz.plot_per_class_accuracy, (np.ones((2, 5)), None), {}, r"per_class must be a non-empty 1-D array \[K\]"),
    (viz.plot_per_class_accuracy, (np.ones(3), ["a", "b"]), {}, "class_names has 2 entries but per_class has 3"),
    (viz.plot_per_class_accuracy, (np.array([50.0, 90.0]), None), {}, r"fractions in \[0, 1\]"),
    (viz.plot_per_class_accuracy, (np.ones(3), "abc"), {}, "got a single string"),
    (viz.plot_confusion_matrix, (np.ones((3, 4)), None), {}, r"cm must be a square 2-D array \[K, K\]"),
    (viz.plot_confusion_matrix, (np.ones(3), None), {}, r"cm must be a square 2-D array \[K, K\]"),
    (viz.plot_confusion_matrix, (np.ones((3, 3)), NAMES), {}, "class_names has 10 entries but cm has 3"),
    (viz.plot_confusion_matrix, (-np.ones((2, 2)), None), {}, "finite non-negative counts"),
    (viz.plot_filters, (np.ones((3, 3, 3)),), {}, r"kernel must be a 4-D array \[kh, kw, c_in, c_out\]"),
    (viz.plot_filters, (np.ones((3, 3, 3, 4)),), {"max_filters": 0}, "max_filters must be >= 1"),
    (viz.plot_filters, (np.ones((3, 3, 2, 4)),), {"channel_reduce": "max"}, "channel_reduce must be"),
    (viz.plot_feature_maps, (np.ones((8, 8)), [("c", np.ones((4, 4, 2)))]), {}, r"image must be \[H, W, C\]"),
    (viz.plot_feature_maps, (np.ones((8, 8, 4)), [("c", np.ones((4, 4, 2)))]), {}, r"C in \(1, 3\)"),
    (viz.plot_feature_maps, (np.ones((8, 8, 3)), []), {}, "feature_maps must be a non-empty list"),
    (viz.plot_feature_maps, (np.ones((8, 8, 3)), [("c1", np.ones((1, 4, 4, 2)))]), {},
     r"feature_maps\[0\] \('c1'\) must be \[h, w, c\]; got shape \(1, 4, 4, 2\) \(index the batch"),
    (viz.plot_feature_maps, (np.ones((8, 8, 3)), [np.ones((4, 4, 2))]), {},
     r"must be a \(name, \[h, w, c\] array\) pair"),
    (viz.plot_feature_maps, (np.ones((8, 8, 3)), [("c", np.ones((4, 4, 2)))]), {"max_channels": 0},
     "max_channels must be >= 1"),
    (viz.plot_lines, ([], {"a": []}, "x", "y", "t"), {}, "xs must be a non-empty 1-D sequence"),
    (viz.plot_lines, ([1, 2], {}, "x", "y", "t"), {}, "series must be a non-empty dict"),
    (viz.plot_lines, ([1, 2], {"a": [1.0]}, "x", "y", "t"), {}, "series 'a' has 1 values but xs has 2"),
    (viz.plot_lines, ([0, 2], {"a": [1.0, 2.0]}, "x", "y", "t"), {"logx": True}, r"logx=True needs all xs > 0"),
]


@pytest.mark.parametrize("fn, args, kwargs, message", BAD, ids=[f"{b[0].__name__}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_clear_value_error(fn, args, kwargs, message, tmp_path):
    path = tmp_path / "bad.png"
    if fn is viz.plot_lines:  # path sits after series; xlabel/ylabel/title follow it
        xs, series, *labels = args
        call = lambda: fn(xs, series, path, *labels, **kwargs)
    else:
        call = lambda: fn(*args, path, **kwargs)
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []
