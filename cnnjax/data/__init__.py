"""Datasets as in-memory uint8 NHWC arrays: local raw files, TFDS (imported lazily) or synthetic stripes.

``import cnnjax.data`` needs neither TensorFlow, TFDS nor torch.
"""

from cnnjax.data.sources import (
    CLASS_NAMES,
    DATASETS,
    MEAN_STD,
    DataFormatError,
    Dataset,
    TFDSUnavailableError,
    load,
)

__all__ = ["CLASS_NAMES", "DATASETS", "MEAN_STD", "DataFormatError", "Dataset", "TFDSUnavailableError", "load"]
