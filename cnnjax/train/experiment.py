"""Building an experiment from its config: the data, the model, the step spec, the optimizer and the
initial train state. Pure of side effects on the workdir."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import checkpoint, models, transfer
from cnnjax.data import MEAN_STD, Dataset, load
from cnnjax.data.folder import scan_folder
from cnnjax.data.pipeline import AugmentConfig
from cnnjax.data.splits import with_validation
from cnnjax.data.stream import ArraySource, FileSource, decodable, decoded_bytes, subset, to_arrays
from cnnjax.errors import ConfigError
from cnnjax.train.optim import make_optimizer
from cnnjax.train.state import TrainState, create_train_state, model_variables
from cnnjax.train.steps import AXIS, Lookahead, StepSpec, init_lookahead


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """train / val / test example sources (:class:`cnnjax.data.stream.ArraySource` in memory, or
    :class:`cnnjax.data.stream.FileSource` decoded on access) and whether training streams them."""

    name: str
    class_names: tuple[str, ...]
    train: Any
    val: Any
    test: Any
    streamed: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


MODES = ("resident", "stream", "auto")


def splits_of(ds: Dataset) -> DataSplits:
    """An in-memory :class:`Dataset` (with its validation split) as resident :class:`DataSplits`."""
    return DataSplits(ds.name, ds.class_names, ArraySource(ds.train_images, ds.train_labels),
                      ArraySource(ds.val_images, ds.val_labels), ArraySource(ds.test_images, ds.test_labels))


def load_splits(config: ml_collections.ConfigDict) -> DataSplits:
    """The config's data as :class:`DataSplits`, resident or streamed per ``data.mode``:
    ``resident`` decodes every split into memory, ``stream`` decodes image files on access (image
    folders; in-memory datasets stream from their arrays), ``auto`` is resident when the decoded
    training split fits ``data.resident_max_gb``."""
    d = config.data
    mode = d.get("mode", "resident")
    if mode not in MODES:
        raise ConfigError("data.mode", f"must be resident, stream or auto, got {mode!r}")
    splits = _folder_splits(config) if d.name == "folder" else splits_of(load_data(config))
    if mode == "auto":
        mode = "resident" if decoded_bytes(splits.train) <= float(d.get("resident_max_gb", 2.0)) * 2**30 else "stream"
    skip = bool(d.get("skip_bad_images", False))
    if mode == "stream":
        return dataclasses.replace(splits, streamed=True, **(
            {k: _checked(getattr(splits, k)) for k in ("train", "val", "test")} if skip else {}))
    return dataclasses.replace(splits, **{k: to_arrays(getattr(splits, k), skip) for k in ("train", "val", "test")})


def _checked(source):
    """``source`` without the files that do not decode (one decoding pass over it)."""
    if isinstance(source, ArraySource):
        return source
    return subset(source, np.nonzero(decodable(source))[0])


def _folder_splits(config: ml_collections.ConfigDict) -> DataSplits:
    d = config.data
    if int(d.get("image_size", 0)) < 1:
        raise ConfigError("data.image_size", "must be set (>= 1) for an image folder: images are resized to it")
    fs = scan_folder(d.dir, tuple(d.get("split_fractions", (0.7, 0.15, 0.15))), int(d.get("split_seed", 0)))
    sources = {}
    for split in ("train", "val", "test"):
        items = getattr(fs, split)
        if not items:
            raise ConfigError("data.split_fractions", f"leave the {split} split of {d.dir} empty; give it a share")
        sources[split] = FileSource([p for p, _ in items], [lab for _, lab in items], int(d.image_size),
                                    int(d.get("channels", 3)))
    splits = DataSplits("folder", fs.class_names, **sources)
    if d.get("classes"):
        splits = _select_source_classes(splits, tuple(d.classes))
    if d.get("train_per_class"):
        rng = np.random.RandomState(config.seed)
        labels = splits.train.labels
        idx = np.sort(np.concatenate([rng.permutation(np.nonzero(labels == c)[0])[: int(d.train_per_class)]
                                      for c in range(splits.num_classes)]))
        splits = dataclasses.replace(splits, train=subset(splits.train, idx))
    return splits


def _select_source_classes(splits: DataSplits, classes: tuple[int, ...]) -> DataSplits:
    if any(not 0 <= int(c) < splits.num_classes for c in classes) or len(set(classes)) != len(classes):
        raise ConfigError("data.classes", f"must be distinct class indices in 0..{splits.num_classes - 1}, got "
                                          f"{tuple(classes)}")
    remap = np.full(splits.num_classes, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes))
    out = {}
    for split in ("train", "val", "test"):
        source = getattr(splits, split)
        keep = np.nonzero(remap[source.labels] >= 0)[0]
        out[split] = subset(source, keep, remap[source.labels[keep]])
    return dataclasses.replace(splits, class_names=tuple(splits.class_names[c] for c in classes), **out)


class Experiment(NamedTuple):
    model: Any
    spec: StepSpec
    state: TrainState  # host, initial (before any resume)
    schedule: Any


def prepare_images(images: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero-pad uint8 ``[N, H, W, C]`` centrally to ``pad_to`` x ``pad_to`` (0: unchanged)."""
    if not pad_to:
        return images
    h, w = images.shape[1:3]
    if pad_to < max(h, w):
        raise ConfigError("data.pad_to", f"is {pad_to}, smaller than the images ({h}x{w})")
    ph, pw = pad_to - h, pad_to - w
    return np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def load_data(config: ml_collections.ConfigDict) -> Dataset:
    """The config's dataset with train / val / test splits: class selection, a validation split held
    out of train (stratified, ``data.val_fraction``, ``data.split_seed``) unless the source has its
    own, per-class subsampling of train, and padding applied."""
    d = config.data
    ds = load(d.name, data_dir=d.dir or None, cache_dir=os.path.expanduser(d.cache_dir) if d.cache_dir else None,
              tfds_data_dir=d.tfds_data_dir or None)
    if d.get("classes"):
        ds = select_classes(ds, tuple(d.classes))
    ds = with_validation(ds, float(d.get("val_fraction", 0.1)), int(d.get("split_seed", 0)))
    if d.get("train_per_class"):
        ds = subsample_per_class(ds, int(d.train_per_class), config.seed)
    pad = lambda images: prepare_images(images, d.pad_to)  # noqa: E731
    return dataclasses.replace(ds, train_images=pad(ds.train_images), val_images=pad(ds.val_images),
                               test_images=pad(ds.test_images))


def select_classes(ds: Dataset, classes: tuple[int, ...]) -> Dataset:
    """Keep only ``classes`` and relabel them 0..len-1 in the given order (every split)."""
    bad = [c for c in classes if not 0 <= int(c) < ds.num_classes]
    if bad or len(set(classes)) != len(classes):
        raise ConfigError("data.classes", f"must be distinct class indices in 0..{ds.num_classes - 1} of {ds.name}, "
                                          f"got {tuple(classes)}")
    remap = np.full(ds.num_classes, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes))
    out = {}
    for split in ("train", "val", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        if images is not None:
            keep = remap[labels] >= 0
            out |= {f"{split}_images": images[keep], f"{split}_labels": remap[labels[keep]]}
    return dataclasses.replace(ds, class_names=tuple(ds.class_names[c] for c in classes), **out)


def subsample_per_class(ds: Dataset, k: int, seed: int) -> Dataset:
    """Keep ``k`` training images per class, chosen with a fixed seed."""
    rng = np.random.RandomState(seed)
    idx = np.concatenate([rng.permutation(np.nonzero(ds.train_labels == c)[0])[:k] for c in range(ds.num_classes)])
    idx.sort()
    return dataclasses.replace(ds, train_images=ds.train_images[idx], train_labels=ds.train_labels[idx])


def normalization(dataset: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std of ``dataset`` (image folders: ImageNet's, for ported backbones)."""
    if dataset == "folder":
        return ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
    return MEAN_STD[dataset]


def build_spec(config: ml_collections.ConfigDict, dataset: str, steps_per_epoch: int) -> StepSpec:
    """What a train / eval step does to a batch of ``dataset`` images under ``config``."""
    mean, std = normalization(dataset, int(config.data.get("channels", 3)))
    every = int(config.get("lookahead_every", 0))
    return StepSpec(
        num_classes=config.num_classes,
        mean=tuple(mean), std=tuple(std),
        augment=AugmentConfig(config.data.crop_padding, config.data.flip, config.data.cutout,
                              pad_mode=config.data.get("pad_mode", "constant"),
                              flip_mode=config.data.get("flip_mode", "random"), steps_per_epoch=steps_per_epoch),
        label_smoothing=config.label_smoothing,
        compute_dtype=jnp.bfloat16 if config.mixed_precision else jnp.float32,
        resize_to=int(config.data.get("resize_to", 0)),
        tta=int(config.get("tta", 0)),
        lookahead=Lookahead(every, steps_per_epoch * config.num_epochs) if every else None,
    )


def build_model(config: ml_collections.ConfigDict) -> tuple[Any, int]:
    """The config's model and how many of its stages transfer learning freezes (0: none)."""
    kwargs = dict(config.model.kwargs.to_dict())
    fields = _fields(config.model.name)
    if config.parallelism == "pmap" and "axis_name" in fields:
        kwargs["axis_name"] = AXIS
    frozen = 0
    if transfer_on(config):
        t = config.transfer
        if "freeze_until" not in fields:
            raise ConfigError("transfer.mode", f"needs a torchvision-layout ResNet, not {config.model.name!r}")
        if t.mode != "scratch" and not t.init_from:
            raise ConfigError("transfer.mode", f"{t.mode} needs `transfer.init_from`=CHECKPOINT_DIR")
        frozen = transfer.freeze_until(t.mode, t.unfreeze_from)
        kwargs["freeze_until"] = frozen
    return models.create(config.model.name, num_classes=config.num_classes, **kwargs), frozen


def transfer_on(config: ml_collections.ConfigDict) -> bool:
    t = config.get("transfer")
    return bool(t is not None and (t.mode != "scratch" or t.init_from))


def _fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(models.create(name))}


def _optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, frozen: int):
    tx, schedule = make_optimizer(config, steps_per_epoch, config.num_epochs)
    if not transfer_on(config):
        return tx, schedule
    t = config.transfer
    backbone_cfg = ml_collections.ConfigDict(config.to_dict())
    backbone_cfg.learning_rate = t.backbone_lr
    backbone_tx, _ = make_optimizer(backbone_cfg, steps_per_epoch, config.num_epochs)
    backbone_tx = transfer.after_steps(backbone_tx, int(t.head_first_epochs * steps_per_epoch))
    return transfer.transfer_optimizer(lambda p: transfer.param_labels(p, frozen), tx, backbone_tx), schedule


def input_shape(image_shape: tuple[int, int, int], spec: StepSpec) -> tuple[int, int, int]:
    """``(H, W, C)`` of what the model sees (after the step's resize)."""
    return (spec.resize_to, spec.resize_to, image_shape[2]) if spec.resize_to else tuple(image_shape)


def build(config: ml_collections.ConfigDict, data: DataSplits | Dataset, steps_per_epoch: int) -> Experiment:
    """Model, step spec, initial host state and learning-rate schedule for ``config`` on ``data``."""
    data = splits_of(data) if isinstance(data, Dataset) else data
    spec = build_spec(config, data.name, steps_per_epoch)
    model, frozen = build_model(config)
    tx, schedule = _optimizer(config, steps_per_epoch, frozen)
    shape = input_shape(data.image_shape, spec)
    try:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    except ValueError as err:
        raise ConfigError("model.name", f"{config.model.name!r} cannot take {data.name} images of shape {shape}: "
                                        f"{err}") from None
    state = create_train_state(model, tx, shape, jax.random.PRNGKey(config.seed))
    if config.get("whiten_init_images", 0):
        from cnnjax.train import airbench

        first = subset(data.train, np.arange(min(int(config.whiten_init_images), len(data.train))))
        state = state.replace(params=airbench.init_whitening(state.params, to_arrays(first).images, spec.mean,
                                                             spec.std))
    if transfer_on(config) and config.transfer.init_from:
        source, _ = checkpoint.restore_variables(config.transfer.init_from, "best")
        merged = transfer.transplant(source, model_variables(state.params, state.batch_stats))
        state = state.replace(params=merged["params"], batch_stats=merged.get("batch_stats", {}))
    if spec.lookahead is not None:
        state = init_lookahead(state)
    return Experiment(model, spec, jax.device_get(state), schedule)
