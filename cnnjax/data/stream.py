"""The order of training examples, random-access example sources, and grain streams over them.

Both data modes use the same order: epoch ``e`` (1-based) visits the training examples in
``np.random.default_rng([seed, 1, e]).permutation(N)``, cut into global batches of ``B`` (the
remainder is dropped), so the global batch of step ``s`` is a function of ``(seed, s)`` only.
``resident`` gathers those indices from the split kept on the device; ``stream`` decodes them on
the host in grain worker processes and each process reads only its own columns of every global
batch. Because a stream is indexed by step (``grain.MapDataset.range(start, total)``), its position
is the train state's step: a checkpoint at step ``s`` resumes the stream at ``s`` exactly.

This module imports numpy, Pillow and grain only (it is unpickled in worker processes).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from cnnjax.data.folder import decode_files, decode_image, decode_pil_image
from cnnjax.data.sources import DataFormatError

# Serialises the lazy opening of a TFDS data source in a process (threads share one source).
_OPEN_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class EpochOrder:
    """Global batches of ``batch_size`` indices into ``num_examples`` training examples, per step."""

    seed: int
    num_examples: int
    batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        """``[N]`` int32: the visiting order of 1-based ``epoch``."""
        return _permutation(self.seed, epoch, self.num_examples)

    def batches(self, step: int, count: int) -> np.ndarray:
        """``[count, B]`` int32 indices of the global batches of steps ``step .. step + count - 1`` (one epoch)."""
        spe = self.steps_per_epoch
        epoch, pos = step // spe + 1, step % spe
        if pos + count > spe:
            raise ValueError(f"steps {step}..{step + count - 1} cross the end of epoch {epoch}")
        rows = self.permutation(epoch)[: spe * self.batch_size].reshape(spe, self.batch_size)
        return rows[pos:pos + count]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([seed, 1, epoch]).permutation(n).astype(np.int32)
    perm.setflags(write=False)
    return perm


# --------------------------------------------------------------------------------------- sources


class ArraySource:
    """Examples held in memory: uint8 ``images [N, H, W, C]``, int32 ``labels [N]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])

    def image(self, i: int) -> np.ndarray:
        return self.images[i]


class FileSource:
    """Image files decoded on access (:func:`cnnjax.data.folder.decode_image`): ``[size, size, channels]``."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int, channels: int):
        self.paths, self.labels = tuple(paths), np.asarray(labels, np.int32)
        self.size, self.channels = int(size), int(channels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.size, self.size, self.channels

    def image(self, i: int) -> np.ndarray:
        return decode_image(self.paths[i], self.size, self.channels)


def decoded_bytes(source) -> int:
    """Bytes of ``source`` decoded to uint8 ``[N, H, W, C]``."""
    return len(source) * int(np.prod(source.image_shape))


def decodable(source) -> np.ndarray:
    """``[N]`` bool: which examples of ``source`` decode (one pass, nothing kept in memory)."""
    if not isinstance(source, FileSource):
        return np.ones(len(source), bool)
    ok = np.zeros(len(source), bool)
    for i in range(len(source)):
        try:
            source.image(i)
            ok[i] = True
        except DataFormatError:
            pass
    if not ok.any():
        raise DataFormatError(f"none of the {len(source)} images decodes (first: {source.paths[0]})")
    return ok


def to_arrays(source, skip_bad: bool = False) -> ArraySource:
    """``source`` decoded into memory; with ``skip_bad`` undecodable files are left out (and counted in
    the log) instead of raising."""
    if isinstance(source, ArraySource):
        return source
    if isinstance(source, TFDSSource):
        images = np.empty((len(source), *source.image_shape), np.uint8)
        for i in range(len(source)):
            images[i] = source.image(i)
        return ArraySource(images, source.labels)
    images, kept = decode_files(source.paths, source.size, source.channels, skip_bad=skip_bad)
    return ArraySource(images, source.labels[kept])


# --------------------------------------------------------------------------------------- grain maps


class StepBatch:
    """grain map: step -> this process's columns ``cols`` of that step's global batch:
    ``{'images' [b, H, W, C] uint8, 'labels' [b] int32, 'ids' [b] int32}`` (ids: training-set indices)."""

    def __init__(self, source, order: EpochOrder, cols: np.ndarray):
        self.source, self.order, self.cols = source, order, np.asarray(cols)

    def __call__(self, step: int) -> dict:
        ids = self.order.batches(int(step), 1)[0][self.cols]
        images = np.stack([self.source.image(int(i)) for i in ids])
        return {"images": images, "labels": self.source.labels[ids], "ids": ids}


class EvalBatch:
    """grain map: batch number -> ``{'images', 'labels', 'mask'}`` of examples ``[start, stop)`` of a
    source in batches of ``batch_size`` (the last one zero-padded, mask 0 on padding)."""

    def __init__(self, source, start: int, stop: int, batch_size: int):
        self.source, self.start, self.stop, self.batch_size = source, start, stop, batch_size

    def __call__(self, k: int) -> dict:
        lo = self.start + int(k) * self.batch_size
        ids = np.arange(lo, min(lo + self.batch_size, self.stop))
        images = np.zeros((self.batch_size, *self.source.image_shape), np.uint8)
        for j, i in enumerate(ids):
            images[j] = self.source.image(int(i))
        labels = np.zeros(self.batch_size, np.int32)
        labels[: len(ids)] = self.source.labels[ids]
        mask = np.zeros(self.batch_size, np.float32)
        mask[: len(ids)] = 1.0
        return {"images": images, "labels": labels, "mask": mask}


def _grain():
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; library use without absl.app must not fail
        flags.FLAGS.mark_as_parsed()
    return grain


def stream(transform, start: int, stop: int, workers: int, buffer: int = 2) -> Iterator[dict]:
    """``transform(k)`` for ``k`` in ``[start, stop)``, in order, computed ahead by ``workers`` grain worker
    processes (0: in this process), each keeping at most ``buffer`` results ready (bounded memory)."""
    grain = _grain()
    ds = grain.MapDataset.range(start, stop).map(transform).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=buffer))
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))
    return iter(ds)


def subset(source, idx: np.ndarray, labels: np.ndarray | None = None):
    """The examples ``idx`` of ``source`` (optionally with new ``labels``), of the same kind."""
    idx = np.asarray(idx, np.int64)
    labels = source.labels[idx] if labels is None else labels
    if isinstance(source, ArraySource):
        return ArraySource(source.images[idx], labels)
    if isinstance(source, TFDSSource):
        return TFDSSource(source.name, source.split, source.data_dir, labels, source.indices[idx],
                          source.image_shape, source.pad_to, source.size)
    return FileSource([source.paths[i] for i in idx], labels, source.size, source.channels)


class TFDSSource:
    """A TFDS split read with ``tfds.data_source`` (ArrayRecord random access; reading needs no TensorFlow),
    opened lazily in each process that reads it (it pickles without the open file handles).

    ``indices`` selects (and orders) examples of the split, ``labels`` are theirs (possibly relabelled).
    Images come out as stored (``pad_to``: zero-padded centrally to ``pad_to`` x ``pad_to``; ``size``:
    shorter side resized to ``size`` and centre-cropped, for datasets of varying image sizes).
    """

    def __init__(self, name: str, split: str, data_dir: str | None, labels: np.ndarray, indices: np.ndarray,
                 image_shape: tuple[int, int, int], pad_to: int = 0, size: int = 0):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.labels, self.indices = np.asarray(labels, np.int32), np.asarray(indices, np.int64)
        self.pad_to, self.size, self._shape = int(pad_to), int(size), tuple(image_shape)
        self._source = None

    @classmethod
    def open(cls, name: str, split: str, data_dir: str | None, pad_to: int = 0, size: int = 0) -> TFDSSource:
        """The whole split; its labels are read once here (a pass over the split)."""
        import tensorflow_datasets as tfds

        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        labels = np.array([int(source[i]["label"]) for i in range(len(source))], np.int32)
        h, w, c = np.shape(source[0]["image"])
        shape = (size, size, c) if size else ((pad_to, pad_to, c) if pad_to else (h, w, c))
        out = cls(name, split, data_dir, labels, np.arange(len(labels)), shape, pad_to, size)
        out._source = source
        return out

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def info(self):
        """The dataset's ``tfds.core.DatasetInfo`` (its splits with their sizes, its features)."""
        return self._opened().dataset_info

    def _opened(self):
        if self._source is None:
            with _OPEN_LOCK:  # the feed's prefetch threads may ask at once: open the source once
                if self._source is None:
                    import tensorflow_datasets as tfds

                    self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                                    download=False)
        return self._source

    def image(self, i: int) -> np.ndarray:
        image = np.asarray(self._opened()[int(self.indices[i])]["image"], np.uint8)
        if self.size:
            from PIL import Image

            return decode_pil_image(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), self.size,
                                    image.shape[-1])
        if self.pad_to:
            h, w = image.shape[:2]
            ph, pw = self.pad_to - h, self.pad_to - w
            image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        return image


Source = ArraySource | FileSource | TFDSSource
"""An example source: ``len``, ``labels`` int32 ``[N]``, ``image_shape`` ``(H, W, C)``, ``image(i)`` uint8
``[H, W, C]``."""
