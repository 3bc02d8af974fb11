"""The data package: every rule from ``config.data`` to train / val / test splits lives here.

One call: :func:`load_splits` (``config -> DataSplits``, resident or streamed; :mod:`cnnjax.data.config_splits`).
Under it: :mod:`~cnnjax.data.sources` (in-memory uint8 NHWC datasets from raw files, TFDS or synthetic
stripes), :mod:`~cnnjax.data.folder` (image folders), :mod:`~cnnjax.data.splits` (hold-outs, per-class
samples, class selection), :mod:`~cnnjax.data.stream` (epoch order, example sources, grain streams) and
:mod:`~cnnjax.data.pipeline` (on-device augmentation and normalisation).

``import cnnjax.data`` needs neither TensorFlow, TFDS nor torch.
"""

from cnnjax.data.config_splits import DataSplits, load_splits
from cnnjax.data.sources import (
    CLASS_NAMES,
    DATASETS,
    MEAN_STD,
    DataFormatError,
    Dataset,
    TFDSUnavailableError,
    load,
    normalization,
)

__all__ = ["CLASS_NAMES", "DATASETS", "MEAN_STD", "DataFormatError", "DataSplits", "Dataset", "TFDSUnavailableError",
           "load", "load_splits", "normalization"]
