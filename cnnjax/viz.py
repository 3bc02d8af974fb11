"""Headless plots of training runs and CNN internals, written as PNG files.

Every function takes plain arrays (numpy, or anything ``np.asarray`` accepts, e.g. jax arrays),
draws on a fresh :class:`matplotlib.figure.Figure` with the Agg canvas (``matplotlib.pyplot`` is
never imported, so no global backend or figure state is touched), writes the PNG atomically
(temporary file in the target directory, then :func:`os.replace`) and returns the path.

* :func:`plot_curves` -- loss and accuracy per epoch, train vs test.
* :func:`plot_per_class_accuracy` -- bar chart of per-class accuracy, values annotated in percent.
* :func:`plot_confusion_matrix` -- ``[K, K]`` confusion matrix (rows true, columns predicted).
* :func:`plot_filters` -- first-layer conv kernels ``[kh, kw, c_in, c_out]`` as a grid of images.
* :func:`plot_feature_maps` -- an input image and a few channels of named activations.
* :func:`plot_lines` -- generic multi-line plot (e.g. transfer accuracy vs number of shots K).

Bad input raises :class:`ValueError` with a one-line message naming what was expected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter

from cnnjax.io import atomic_write

PathLike = str | os.PathLike

_DPI = 120
_CURVE_KEYS = ("epoch", "train_loss", "test_loss", "train_accuracy", "test_accuracy")
_CELL_TEXT_MAX_K = 20
_MAX_TICK_LABELS = 50


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A standalone figure with an Agg canvas attached (no pyplot involved)."""
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> str:
    """Write ``fig`` as PNG to ``path`` atomically; on any failure nothing is left behind."""
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=_DPI)
    return os.fspath(path)


def _class_names(class_names: Sequence[str] | None, k: int, what: str) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(k)]
    if isinstance(class_names, str):
        raise ValueError(f"class_names must be a sequence of {k} strings, got a single string")
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} entries but {what} has {k} classes")
    return names


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None, bool]:
    """``[H, W, C]`` (C in 1, 3) -> (array for imshow, cmap, whether it was min-max rescaled)."""
    if image.shape[-1] == 1:
        image = image[..., 0]
    cmap = "gray" if image.ndim == 2 else None
    if image.dtype == np.uint8:
        return image, cmap, False
    image = image.astype(np.float64)
    lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    if lo >= 0.0 and hi <= 1.0:
        return image, cmap, False
    span = hi - lo
    return ((image - lo) / span if span > 0 else np.full_like(image, 0.5)), cmap, True


def _strip_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------------------------
# public plots
# ----------------------------------------------------------------------------------------------


def plot_curves(history: Sequence[Mapping[str, Any]], path: PathLike, title: str = "Training curves",
                split: str = "test") -> str:
    """Loss (left) and accuracy (right) per epoch, train vs ``split`` ('test' or 'val').

    ``history`` is one dict per epoch with keys ``epoch, train_loss, {split}_loss, train_accuracy,
    {split}_accuracy`` (a ``None`` value is drawn as a gap). Accuracies are plotted as given
    (fractions or percent). A single epoch works (every point has a marker).
    """
    keys = tuple(k.replace("test", split) for k in _CURVE_KEYS)
    if isinstance(history, Mapping) or not isinstance(history, Sequence) or len(history) == 0:
        raise ValueError("history must be a non-empty list of per-epoch dicts with keys " + ", ".join(keys))
    for i, row in enumerate(history):
        if not isinstance(row, Mapping):
            raise ValueError(f"history[{i}] must be a dict with keys {', '.join(keys)}; "
                             f"got {type(row).__name__}")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"history[{i}] is missing key(s) {', '.join(missing)}; expected {', '.join(keys)}")
    col = {k: np.array([_as_float(row[k]) for row in history]) for k in keys}
    epochs = col["epoch"]

    fig = _new_figure(10.0, 4.0)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, col[f"train_{metric}"], marker="o", markersize=4, label=f"train {label}")
        ax.plot(epochs, col[f"{split}_{metric}"], marker="s", markersize=4, label=f"{split} {label}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    if len(epochs) <= 12 and np.all(np.isfinite(epochs)):
        for ax in (ax_loss, ax_acc):
            ax.set_xticks(epochs)
            ax.set_xticklabels([f"{e:g}" for e in epochs])
    fig.suptitle(title)
    return _save(fig, path)


def plot_per_class_accuracy(
    per_class: np.ndarray,
    class_names: Sequence[str] | None,
    path: PathLike,
    title: str = "Per-class accuracy",
) -> str:
    """Horizontal bar chart of per-class accuracy, each bar annotated in percent.

    ``per_class`` is ``[K]`` fractions in ``[0, 1]`` (NaN, e.g. a class with no test samples,
    is shown as "n/a"); ``class_names`` has ``K`` entries (``None``: ``"0" .. "K-1"``). A dashed
    line marks the mean over classes.
    """
    acc = np.asarray(per_class, dtype=np.float64)
    if acc.ndim != 1 or acc.size == 0:
        raise ValueError(f"per_class must be a non-empty 1-D array [K]; got shape {acc.shape}")
    finite = acc[np.isfinite(acc)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError(f"per_class must hold fractions in [0, 1]; got range [{finite.min():g}, {finite.max():g}]"
                         " (divide percentages by 100)")
    k = acc.size
    names = _class_names(class_names, k, "per_class")
    pct = acc * 100.0

    fig = _new_figure(7.0, max(2.5, 0.32 * k + 1.3))
    ax = fig.subplots()
    y = np.arange(k)
    ax.barh(y, np.nan_to_num(pct), color="tab:blue", alpha=0.85)
    fontsize = 9 if k <= 30 else 7
    for yi, value in zip(y, pct, strict=True):
        text = "n/a" if not np.isfinite(value) else f"{value:.1f}%"
        ax.text((value if np.isfinite(value) else 0.0) + 1.0, yi, text, va="center", ha="left", fontsize=fontsize,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})
    if finite.size:
        mean = float(finite.mean()) * 100.0
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean {mean:.1f}%")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=fontsize)
    ax.invert_yaxis()  # first class at the top
    ax.set_xlim(0.0, 112.0)  # room for the annotation of a 100% bar
    ax.set_xticks(np.arange(0, 101, 20))
    ax.set_xlabel("accuracy (%)")
    ax.set_ylabel("class")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def plot_confusion_matrix(
    cm: np.ndarray,
    class_names: Sequence[str] | None,
    path: PathLike,
    normalize: bool = True,
    title: str = "Confusion matrix",
) -> str:
    """Confusion matrix image with a colour bar; rows are true classes, columns predicted.

    ``cm`` is ``[K, K]`` non-negative counts. ``normalize=True`` divides each row by its total
    (per-true-class recall; an all-zero row stays zero). Cell values are written when ``K <= 20``.
    """
    counts = np.asarray(cm)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"cm must be a square 2-D array [K, K] of counts; got shape {counts.shape}")
    counts = counts.astype(np.float64)
    if not np.all(np.isfinite(counts)) or counts.min() < 0:
        raise ValueError("cm must hold finite non-negative counts")
    k = counts.shape[0]
    names = _class_names(class_names, k, "cm")
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        vmax = 1.0
    else:
        values = counts
        vmax = max(float(values.max()), 1.0)

    side = min(max(4.5, 0.45 * k + 2.5), 14.0)
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class" if normalize else "count")

    stride = max(1, math.ceil(k / _MAX_TICK_LABELS))
    ticks = np.arange(0, k, stride)
    tick_fontsize = 9 if k <= 20 else (7 if k <= 50 else 6)
    rotate = k > 10 or max(len(n) for n in names) > 3
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks], fontsize=tick_fontsize,
                       rotation=45 if rotate else 0, ha="right" if rotate else "center", rotation_mode="anchor")
    ax.set_yticklabels([names[i] for i in ticks], fontsize=tick_fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title + (" (row-normalised)" if normalize else " (counts)"))

    if k <= _CELL_TEXT_MAX_K:
        cell_fontsize = 9 if k <= 10 else 7
        for i in range(k):
            for j in range(k):
                v = values[i, j]
                text = f"{v:.2f}" if normalize else f"{int(round(v))}"
                ax.text(j, i, text, ha="center", va="center", fontsize=cell_fontsize,
                        color="white" if v > 0.5 * vmax else "black")
    return _save(fig, path)


def plot_filters(
    kernel: np.ndarray,
    path: PathLike,
    max_filters: int = 64,
    channel_reduce: Literal["mean", "first"] = "mean",
    title: str = "First-layer filters",
) -> str:
    """Grid of the first ``max_filters`` conv filters of a kernel ``[kh, kw, c_in, c_out]`` (Flax layout).

    ``c_in == 3``: each filter is shown in RGB, min-max normalised on its own. Otherwise the
    filter is reduced over input channels (``channel_reduce``: mean, or the first channel) and
    shown with a diverging colormap, symmetric around 0 per filter (red positive, blue negative).
    """
    w = np.asarray(kernel, dtype=np.float64)
    if w.ndim != 4 or 0 in w.shape:
        raise ValueError(f"kernel must be a 4-D array [kh, kw, c_in, c_out]; got shape {w.shape}")
    if max_filters < 1:
        raise ValueError(f"max_filters must be >= 1; got {max_filters}")
    if channel_reduce not in ("mean", "first"):
        raise ValueError(f"channel_reduce must be 'mean' or 'first'; got {channel_reduce!r}")
    kh, kw, c_in, c_out = w.shape
    n = min(c_out, max_filters)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    rgb = c_in == 3

    cell = 0.9 if ncols > 4 else 1.4
    fig = _new_figure(max(4.0, ncols * cell), max(2.0, nrows * cell) + 0.7)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for idx, ax in enumerate(axes):
        _strip_ticks(ax)
        if idx >= n:
            ax.set_axis_off()
            continue
        f = w[..., idx]
        if rgb:
            lo, hi = f.min(), f.max()
            img = (f - lo) / (hi - lo) if hi > lo else np.full_like(f, 0.5)
            ax.imshow(img, interpolation="nearest")
        else:
            img = f.mean(axis=-1) if channel_reduce == "mean" else f[..., 0]
            vmax = float(np.abs(img).max()) or 1.0
            ax.imshow(img, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_title(str(idx), fontsize=7, pad=2)
    if rgb:
        how = "RGB, each min-max normalised"
    elif c_in == 1 or channel_reduce == "first":
        how = "input channel 0, red +, blue -"
    else:
        how = f"mean over {c_in} input channels, red +, blue -"
    shown = f"{n} of {c_out}" if n < c_out else f"{c_out}"
    fig.suptitle(f"{title}\n{shown} filters {kh}x{kw}x{c_in} ({how})", fontsize=10)
    return _save(fig, path)


def plot_feature_maps(
    image: np.ndarray,
    feature_maps: Sequence[tuple[str, np.ndarray]],
    path: PathLike,
    max_channels: int = 8,
    title: str = "Feature maps of one image",
) -> str:
    """The input image (first row) and up to ``max_channels`` channels of each named activation.

    ``image`` is ``[H, W, C]`` with ``C`` in (1, 3), uint8 or float (floats outside ``[0, 1]``
    are min-max scaled for display). ``feature_maps`` is ``[(name, [h, w, c]), ...]`` for one
    example (index the batch away first); one row per layer, each channel on its own colour scale.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"image must be [H, W, C] with C in (1, 3); got shape {img.shape}")
    if max_channels < 1:
        raise ValueError(f"max_channels must be >= 1; got {max_channels}")
    if isinstance(feature_maps, Mapping) or len(feature_maps) == 0:
        raise ValueError("feature_maps must be a non-empty list of (name, [h, w, c] array) pairs")
    layers: list[tuple[str, np.ndarray]] = []
    for i, item in enumerate(feature_maps):
        if not (isinstance(item, Sequence) and len(item) == 2):
            raise ValueError(f"feature_maps[{i}] must be a (name, [h, w, c] array) pair")
        name, fmap = item
        fmap = np.asarray(fmap, dtype=np.float64)
        if fmap.ndim != 3 or 0 in fmap.shape:
            hint = " (index the batch away, e.g. fmap[0])" if fmap.ndim == 4 else ""
            raise ValueError(f"feature_maps[{i}] ({name!r}) must be [h, w, c]; got shape {fmap.shape}{hint}")
        layers.append((str(name), fmap))

    ncols = max(2, min(max_channels, max(f.shape[-1] for _, f in layers)))
    nrows = 1 + len(layers)
    cell = 1.3
    fig = _new_figure(ncols * cell + 1.0, nrows * (cell + 0.15) + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)

    shown, cmap, rescaled = _display_image(img)
    ax = axes[0, 0]
    ax.imshow(shown, cmap=cmap, interpolation="nearest")
    _strip_ticks(ax)
    ax.set_ylabel(f"input\n{img.shape[0]}x{img.shape[1]}x{img.shape[2]}", fontsize=8)
    if rescaled:
        ax.set_title("(min-max scaled)", fontsize=6, pad=2)
    for ax in axes[0, 1:]:
        ax.set_axis_off()

    for r, (name, fmap) in enumerate(layers, start=1):
        h, w, c = fmap.shape
        for j, ax in enumerate(axes[r]):
            if j >= min(c, max_channels):
                ax.set_axis_off()
                continue
            ax.imshow(fmap[..., j], cmap="viridis", interpolation="nearest")
            _strip_ticks(ax)
            ax.set_title(f"ch {j}", fontsize=7, pad=2)
        axes[r, 0].set_ylabel(f"{name}\n{h}x{w}x{c}", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_lines(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: PathLike,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> str:
    """One line per named series against shared ``xs`` (``[N]``; each series ``[N]``, ``None`` = gap).

    ``logx=True`` uses a log x axis (all ``xs`` must be > 0). With at most 12 points the x ticks
    sit exactly on ``xs`` (handy for e.g. accuracy vs number of shots K).
    """
    x = np.asarray([_as_float(v) for v in xs], dtype=np.float64) if len(xs) else np.zeros(0)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"xs must be a non-empty 1-D sequence of numbers; got shape {x.shape}")
    if not isinstance(series, Mapping) or len(series) == 0:
        raise ValueError("series must be a non-empty dict {name: list of y values}")
    ys: dict[str, np.ndarray] = {}
    for name, values in series.items():
        y = np.asarray([_as_float(v) for v in values], dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"series {name!r} has {y.size} values but xs has {x.size}")
        ys[str(name)] = y
    if logx and not np.all(x > 0):
        raise ValueError("logx=True needs all xs > 0")

    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    markers = "osD^v<>ph*"
    for i, (name, y) in enumerate(ys.items()):
        ax.plot(x, y, marker=markers[i % len(markers)], markersize=5, label=name)
    if logx:
        ax.set_xscale("log")
    if x.size <= 12:
        ax.xaxis.set_major_locator(FixedLocator(x))
        ax.set_xticklabels([f"{v:g}" for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)
