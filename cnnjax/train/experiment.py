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
from cnnjax.data.pipeline import AugmentConfig
from cnnjax.data.splits import with_validation
from cnnjax.errors import ConfigError
from cnnjax.train.optim import make_optimizer
from cnnjax.train.state import TrainState, create_train_state, model_variables
from cnnjax.train.steps import AXIS, Lookahead, StepSpec, init_lookahead


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


def build_spec(config: ml_collections.ConfigDict, dataset: str, steps_per_epoch: int) -> StepSpec:
    """What a train / eval step does to a batch of ``dataset`` images under ``config``."""
    mean, std = MEAN_STD[dataset]
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


def input_shape(ds: Dataset, spec: StepSpec) -> tuple[int, int, int]:
    """``(H, W, C)`` of what the model sees (after the step's resize)."""
    shape = ds.train_images.shape[1:]
    return (spec.resize_to, spec.resize_to, shape[2]) if spec.resize_to else tuple(shape)


def build(config: ml_collections.ConfigDict, ds: Dataset, steps_per_epoch: int) -> Experiment:
    """Model, step spec, initial host state and learning-rate schedule for ``config`` on data like ``ds``."""
    spec = build_spec(config, ds.name, steps_per_epoch)
    model, frozen = build_model(config)
    tx, schedule = _optimizer(config, steps_per_epoch, frozen)
    shape = input_shape(ds, spec)
    try:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    except ValueError as err:
        raise ConfigError("model.name", f"{config.model.name!r} cannot take {ds.name} images of shape {shape}: "
                                        f"{err}") from None
    state = create_train_state(model, tx, shape, jax.random.PRNGKey(config.seed))
    if config.get("whiten_init_images", 0):
        from cnnjax.train import airbench

        state = state.replace(params=airbench.init_whitening(
            state.params, ds.train_images[: int(config.whiten_init_images)], spec.mean, spec.std))
    if transfer_on(config) and config.transfer.init_from:
        source, _ = checkpoint.restore_variables(config.transfer.init_from, "best")
        merged = transfer.transplant(source, model_variables(state.params, state.batch_stats))
        state = state.replace(params=merged["params"], batch_stats=merged.get("batch_stats", {}))
    if spec.lookahead is not None:
        state = init_lookahead(state)
    return Experiment(model, spec, jax.device_get(state), schedule)
