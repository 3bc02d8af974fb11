"""Building an experiment from its config and its data: the model, the step spec, the optimizer and the
initial train state. Pure of side effects on the workdir. The data itself comes from
:func:`cnnjax.data.load_splits` (every data rule lives in :mod:`cnnjax.data`)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cnnjax import checkpoint, models, transfer
from cnnjax.data import Dataset, DataSplits, normalization
from cnnjax.data.config_splits import splits_of
from cnnjax.data.pipeline import AugmentConfig
from cnnjax.data.stream import subset, to_arrays
from cnnjax.errors import ConfigError
from cnnjax.train.optim import make_optimizer
from cnnjax.train.runner import Runner, resolve_parallelism, scan_choice
from cnnjax.train.state import TrainState, create_train_state, model_variables
from cnnjax.train.steps import AXIS, Lookahead, StepSpec, init_lookahead
from cnnjax.train.timeline import check_replans


class Experiment(NamedTuple):
    model: Any
    spec: StepSpec
    state: TrainState  # host, initial (before any resume)
    schedule: Any


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
        precision=PRECISIONS[config.get("precision", "default")],
    )


# config.precision -> StepSpec.precision: the float32 matmul / conv precision of the steps (None: XLA's default,
# which on NVIDIA GPUs since Ampere and on TPUs lets convolutions and matmuls round their inputs to TF32 / bf16).
PRECISIONS = {"default": None, "high": "high", "highest": "highest"}


def chunk_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Steps per chunk of the training loop: ``log_every``, at most an epoch."""
    return max(1, min(int(config.log_every), steps_per_epoch))


def runner_for(config: ml_collections.ConfigDict, exp: Experiment, devices: list, steps_per_epoch: int) -> Runner:
    """The :class:`Runner` of a run of ``config``: its parallelism, ``loop.scan`` and constant chunk length."""
    scan = scan_choice(config.get("loop", {}).get("scan", "auto"))
    return Runner(exp.spec, exp.model.apply, resolve_parallelism(config.parallelism, devices), devices, scan=scan,
                  chunk_steps=chunk_steps(config, steps_per_epoch))


def build_model(config: ml_collections.ConfigDict) -> tuple[Any, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The config's model and, for transfer learning, ``(frozen stages, head)`` (empty tuples otherwise); a
    model with frozen stages is wrapped in :class:`cnnjax.transfer.Frozen`."""
    kwargs = dict(config.model.kwargs.to_dict())
    if config.parallelism == "pmap" and "axis_name" in _fields(config.model.name):
        kwargs["axis_name"] = AXIS
    model = models.create(config.model.name, num_classes=config.num_classes, **kwargs)
    if not transfer_on(config):
        return model, ((), ())
    t = config.transfer
    if t.mode != "scratch" and not t.init_from:
        raise ConfigError("transfer.mode", f"{t.mode} needs `transfer.init_from`=CHECKPOINT_DIR")
    layout = transfer.stage_layout(config.model.name, models.DEFAULT_INPUT_SHAPES[config.model.name], **kwargs)
    if not layout.head:
        raise ConfigError("transfer.mode", f"{config.model.name!r} has no classification head to replace")
    frozen = transfer.frozen_stages(layout, t.mode, t.unfreeze_from)
    return (transfer.Frozen(model, frozen) if frozen else model), (frozen, layout.head)


def transfer_on(config: ml_collections.ConfigDict) -> bool:
    t = config.get("transfer")
    return bool(t is not None and (t.mode != "scratch" or t.init_from))


def _fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(models.create(name))}


def _optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
               parts: tuple[tuple[str, ...], tuple[str, ...]]):
    tx, schedule = make_optimizer(config, steps_per_epoch, config.num_epochs)
    if not transfer_on(config):
        return tx, schedule
    t = config.transfer
    backbone_cfg = ml_collections.ConfigDict(config.to_dict())
    backbone_cfg.learning_rate = t.backbone_lr
    backbone_tx, _ = make_optimizer(backbone_cfg, steps_per_epoch, config.num_epochs)
    backbone_tx = transfer.after_steps(backbone_tx, int(t.head_first_epochs * steps_per_epoch))
    frozen, head = parts
    return transfer.transfer_optimizer(lambda p: transfer.param_labels(p, frozen, head), tx, backbone_tx), schedule


def retime(config: ml_collections.ConfigDict, exp: Experiment, dataset: str,
           steps_per_epoch: int) -> tuple[Experiment, optax.GradientTransformation]:
    """``exp`` for ``config``'s new length (``num_epochs``, ``budget_replans``): its step spec and schedule, and
    the optimizer for its train state (the same transformations, so the optimizer state carries over)."""
    _, parts = build_model(config)
    tx, schedule = _optimizer(config, steps_per_epoch, parts)
    return exp._replace(spec=build_spec(config, dataset, steps_per_epoch), schedule=schedule), tx


def input_shape(image_shape: tuple[int, int, int], spec: StepSpec) -> tuple[int, int, int]:
    """``(H, W, C)`` of what the model sees (after the step's resize)."""
    return (spec.resize_to, spec.resize_to, image_shape[2]) if spec.resize_to else tuple(image_shape)


def build(config: ml_collections.ConfigDict, data: DataSplits | Dataset, steps_per_epoch: int) -> Experiment:
    """Model, step spec, initial host state and learning-rate schedule for ``config`` on ``data``."""
    data = splits_of(data) if isinstance(data, Dataset) else data
    spec = build_spec(config, data.name, steps_per_epoch)
    model, parts = build_model(config)
    tx, schedule = _optimizer(config, steps_per_epoch, parts)
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
        merged = transfer.transplant(source, model_variables(state.params, state.batch_stats), head=parts[1])
        state = state.replace(params=merged["params"], batch_stats=merged.get("batch_stats", {}))
    if spec.lookahead is not None:
        state = init_lookahead(state)
    return Experiment(model, spec, jax.device_get(state), schedule)
