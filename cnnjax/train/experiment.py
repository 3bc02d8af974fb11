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
import optax

from cnnjax import checkpoint, models, transfer
from cnnjax.data import MEAN_STD, Dataset, load
from cnnjax.data.folder import scan_folder
from cnnjax.data.pipeline import AugmentConfig
from cnnjax.data.splits import per_class_sample, with_validation
from cnnjax.data.stream import ArraySource, FileSource, decodable, decoded_bytes, subset, to_arrays
from cnnjax.errors import ConfigError
from cnnjax.train.optim import make_optimizer
from cnnjax.train.state import TrainState, create_train_state, model_variables
from cnnjax.train.steps import AXIS, Lookahead, StepSpec, init_lookahead
from cnnjax.train.timeline import check_replans


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
    """An in-memory :class:`Dataset` as resident :class:`DataSplits` (an empty val split if it has none)."""
    val = (ArraySource(ds.val_images, ds.val_labels) if ds.val_images is not None
           else ArraySource(ds.train_images[:0], ds.train_labels[:0]))
    return DataSplits(ds.name, ds.class_names, ArraySource(ds.train_images, ds.train_labels), val,
                      ArraySource(ds.test_images, ds.test_labels))


def load_splits(config: ml_collections.ConfigDict) -> DataSplits:
    """The config's data as :class:`DataSplits`, resident or streamed per ``data.mode``:
    ``resident`` decodes every split into memory, ``stream`` decodes image files on access (image
    folders; in-memory datasets stream from their arrays), ``auto`` is resident when the decoded
    training split fits ``data.resident_max_gb``."""
    d = config.data
    mode = d.get("mode", "resident")
    if mode not in MODES:
        raise ConfigError("data.mode", f"must be resident, stream or auto, got {mode!r}")
    if d.name == "folder":
        splits = _folder_splits(config)
    elif mode != "resident" and not d.dir and d.name in TFDS_STREAMABLE and _tfds_streams(config, mode):
        splits = _tfds_splits(config)
    else:
        splits = splits_of(load_data(config))
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
    return _narrow(DataSplits("folder", fs.class_names, **sources), config)


TFDS_STREAMABLE = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenette", "imagenet2012")


def _open_tfds(name: str, split: str, config: ml_collections.ConfigDict):
    from cnnjax.data.sources import _brief, _tfds_error
    from cnnjax.data.stream import TFDSSource

    d = config.data
    try:
        return TFDSSource.open(name, split, d.tfds_data_dir or None, int(d.pad_to), int(d.get("image_size", 0)))
    except ImportError as err:
        raise _tfds_error(name, d.tfds_data_dir or None,
                          f"tensorflow_datasets is not installed ({_brief(err)})") from err
    except Exception as err:  # noqa: BLE001 - not prepared, unreadable: one message either way
        raise _tfds_error(name, d.tfds_data_dir or None, f"cannot open its {split} split for streaming; prepare it "
                                                         f"first ({_brief(err)})") from err


def _tfds_streams(config: ml_collections.ConfigDict, mode: str) -> bool:
    """stream: always; auto: when the training split's decoded size (from the dataset info) exceeds the budget."""
    if mode == "stream":
        return True
    train = _open_tfds(config.data.name, "train", config)
    info = train._source.dataset_info
    return info.splits["train"].num_examples * int(np.prod(train.image_shape)) > float(
        config.data.get("resident_max_gb", 2.0)) * 2**30


def _tfds_splits(config: ml_collections.ConfigDict) -> DataSplits:
    """A TFDS dataset streamed through ``tfds.data_source``: test is its ``test`` split (else ``validation``);
    val is ``validation`` when both exist, else held out of train (stratified, ``data.val_fraction``)."""
    from cnnjax.data import CLASS_NAMES
    from cnnjax.data.splits import stratified_holdout

    d = config.data
    train = _open_tfds(d.name, "train", config)
    info = train._source.dataset_info
    have = set(info.splits.keys())
    names = tuple(CLASS_NAMES.get(d.name) or (str(n) for n in info.features["label"].names))
    splits = {"train": train, "test": _open_tfds(d.name, "test" if "test" in have else "validation", config)}
    if "test" in have and "validation" in have:
        splits["val"] = _open_tfds(d.name, "validation", config)
    if d.get("classes"):  # before the hold-out, as for in-memory datasets (the same validation split)
        remap = _class_remap(len(names), tuple(d.classes))
        splits = {k: _relabel(v, remap) for k, v in splits.items()}
        names = tuple(names[c] for c in d.classes)
    if "val" not in splits:
        keep, held = stratified_holdout(splits["train"].labels, float(d.get("val_fraction", 0.1)),
                                        int(d.get("split_seed", 0)))
        splits["train"], splits["val"] = subset(splits["train"], keep), subset(splits["train"], held)
    return _narrow(DataSplits(d.name, names, **splits), config, classes=False)


def _narrow(splits: DataSplits, config: ml_collections.ConfigDict, classes: bool = True) -> DataSplits:
    """``data.classes`` (kept and relabelled) and ``data.train_per_class`` applied to source splits."""
    d = config.data
    if classes and d.get("classes"):
        splits = _select_source_classes(splits, tuple(d.classes))
    if d.get("train_per_class"):
        idx = per_class_sample(splits.train.labels, int(d.train_per_class), config.seed, splits.num_classes)
        splits = dataclasses.replace(splits, train=subset(splits.train, idx))
    return splits


def _class_remap(num_classes: int, classes: tuple[int, ...]) -> np.ndarray:
    if any(not 0 <= int(c) < num_classes for c in classes) or len(set(classes)) != len(classes):
        raise ConfigError("data.classes", f"must be distinct class indices in 0..{num_classes - 1}, got "
                                          f"{tuple(classes)}")
    remap = np.full(num_classes, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes))
    return remap


def _relabel(source, remap: np.ndarray):
    keep = np.nonzero(remap[source.labels] >= 0)[0]
    return subset(source, keep, remap[source.labels[keep]])


def _select_source_classes(splits: DataSplits, classes: tuple[int, ...]) -> DataSplits:
    remap = _class_remap(splits.num_classes, classes)
    return dataclasses.replace(splits, class_names=tuple(splits.class_names[c] for c in classes),
                               **{k: _relabel(getattr(splits, k), remap) for k in ("train", "val", "test")})


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
    remap = _class_remap(ds.num_classes, classes)
    out = {}
    for split in ("train", "val", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        if images is not None:
            keep = remap[labels] >= 0
            out |= {f"{split}_images": images[keep], f"{split}_labels": remap[labels[keep]]}
    return dataclasses.replace(ds, class_names=tuple(ds.class_names[c] for c in classes), **out)


def subsample_per_class(ds: Dataset, k: int, seed: int) -> Dataset:
    """Keep ``k`` training images per class, chosen with a fixed seed."""
    idx = per_class_sample(ds.train_labels, k, seed, ds.num_classes)
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
                              flip_mode=config.data.get("flip_mode", "random"), steps_per_epoch=steps_per_epoch,
                              random_resized_crop=float(config.data.get("random_resized_crop", 0.0))),
        label_smoothing=config.label_smoothing,
        compute_dtype=jnp.bfloat16 if config.mixed_precision else jnp.float32,
        resize_to=int(config.data.get("resize_to", 0)),
        tta=int(config.get("tta", 0)),
        lookahead=Lookahead(every, steps_per_epoch * config.num_epochs,
                            replans=check_replans(config.get("budget_replans", ()))) if every else None,
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


def retime(config: ml_collections.ConfigDict, exp: Experiment, dataset: str,
           steps_per_epoch: int) -> tuple[Experiment, optax.GradientTransformation]:
    """``exp`` for ``config``'s new length (``num_epochs``, ``budget_replans``): its step spec and schedule, and
    the optimizer for its train state (the same transformations, so the optimizer state carries over)."""
    _, frozen = build_model(config)
    tx, schedule = _optimizer(config, steps_per_epoch, frozen)
    return exp._replace(spec=build_spec(config, dataset, steps_per_epoch), schedule=schedule), tx


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
    try:  # a model that cannot take this shape fails while its init is traced, before anything runs
        state = create_train_state(model, tx, shape, jax.random.PRNGKey(config.seed))
    except ValueError as err:
        raise ConfigError("model.name", f"{config.model.name!r} cannot take {data.name} images of shape {shape}: "
                                        f"{err}") from None
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
