"""``fit(config, workdir)``: the experiment loop — data on device, epochs, eval, checkpoints, logs, plots.

Reproducible and resumable: epoch ``e`` shuffles with ``fold_in(data_key, e)``, each step's
augmentation / dropout key is ``fold_in(state.rng, state.step)``, and a checkpoint records the
position inside the epoch, so an interrupted run resumed from its checkpoint ends with the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cnnjax import checkpoint, models, transfer
from cnnjax.data import MEAN_STD, Dataset, load
from cnnjax.data.pipeline import FLIP_MODES, PAD_MODES, AugmentConfig, epoch_batches
from cnnjax.train.optim import make_optimizer
from cnnjax.train.state import TrainState, create_train_state, model_variables
from cnnjax.train.steps import AXIS, TTA_LEVELS, Lookahead, Runner, StepSpec, init_lookahead, prepare_batch

# Config fields that define an experiment's checkpoints: a workdir holding checkpoints made with
# other values belongs to another experiment.
IDENTITY_KEYS = ("model.name", "model.kwargs", "data.name", "data.pad_to", "num_classes", "transfer.mode",
                 "transfer.unfreeze_from")


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, bad workdir): the message says what to do."""


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        if part not in value:
            return None  # a key older configs did not have
        value = value[part]
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def identity(config: ml_collections.ConfigDict) -> dict:
    return {k: _get(config, k) for k in IDENTITY_KEYS}


def _write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary file and rename it over ``path``: never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Create ``workdir`` with ``config.json``, or check that an existing one is this experiment's."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    has_ckpt = any(checkpoint.steps(workdir, k) for k in checkpoint.KINDS)
    if os.path.exists(path) and has_ckpt:
        with open(path) as f:
            old = json.load(f)
        old_id = identity(ml_collections.ConfigDict(old))
        if old_id != identity(config):
            diff = {k: (old_id[k], identity(config)[k]) for k in IDENTITY_KEYS if old_id[k] != identity(config)[k]}
            raise TrainingError(f"workdir {workdir} holds checkpoints of another experiment (differs in "
                                f"{diff}); use a new --workdir or delete that one")
    write_json_atomic(path, config.to_dict())


def prepare_images(images: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero-pad uint8 ``[N, H, W, C]`` centrally to ``pad_to`` x ``pad_to`` (0: unchanged)."""
    if not pad_to:
        return images
    h, w = images.shape[1:3]
    if pad_to < max(h, w):
        raise ValueError(f"data.pad_to={pad_to} is smaller than the images ({h}x{w})")
    ph, pw = pad_to - h, pad_to - w
    return np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def load_data(config: ml_collections.ConfigDict) -> Dataset:
    d = config.data
    ds = load(d.name, data_dir=d.dir or None, cache_dir=os.path.expanduser(d.cache_dir) if d.cache_dir else None,
              tfds_data_dir=d.tfds_data_dir or None)
    if d.get("classes"):
        ds = select_classes(ds, tuple(d.classes))
    if d.get("train_per_class"):
        ds = subsample_per_class(ds, int(d.train_per_class), config.seed)
    return ds


def select_classes(ds: Dataset, classes: tuple[int, ...]) -> Dataset:
    """Keep only ``classes`` and relabel them 0..len-1 in the given order."""
    remap = np.full(ds.num_classes, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes))

    def pick(images, labels):
        keep = remap[labels] >= 0
        return images[keep], remap[labels[keep]]

    tr, tl = pick(ds.train_images, ds.train_labels)
    te, tel = pick(ds.test_images, ds.test_labels)
    return Dataset(ds.name, tr, tl, te, tel, tuple(ds.class_names[c] for c in classes))


def subsample_per_class(ds: Dataset, k: int, seed: int) -> Dataset:
    """Keep ``k`` training images per class, chosen with a fixed seed."""
    rng = np.random.RandomState(seed)
    idx = np.concatenate([rng.permutation(np.nonzero(ds.train_labels == c)[0])[:k] for c in range(ds.num_classes)])
    idx.sort()
    return Dataset(ds.name, ds.train_images[idx], ds.train_labels[idx], ds.test_images, ds.test_labels,
                   ds.class_names)


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
    if _transfer_on(config):
        t = config.transfer
        if "freeze_until" not in fields:
            raise ValueError(f"transfer learning needs a torchvision-layout ResNet, not {config.model.name!r}")
        if t.mode != "scratch" and not t.init_from:
            raise ValueError(f"--config.transfer.mode={t.mode} needs --config.transfer.init_from=CHECKPOINT_DIR")
        frozen = transfer.freeze_until(t.mode, t.unfreeze_from)
        kwargs["freeze_until"] = frozen
    return models.create(config.model.name, num_classes=config.num_classes, **kwargs), frozen


def _transfer_on(config: ml_collections.ConfigDict) -> bool:
    t = config.get("transfer")
    return bool(t is not None and (t.mode != "scratch" or t.init_from))


def build(config: ml_collections.ConfigDict, ds: Dataset, steps_per_epoch: int):
    """Model, optimizer, step spec and initial state for ``config`` on data shaped like ``ds``."""
    spec = build_spec(config, ds.name, steps_per_epoch)
    model, frozen = build_model(config)
    t, transfer_on = config.get("transfer"), _transfer_on(config)
    tx, schedule = make_optimizer(config, steps_per_epoch, config.num_epochs)
    if transfer_on:
        backbone_cfg = ml_collections.ConfigDict(config.to_dict())
        backbone_cfg.learning_rate = t.backbone_lr
        backbone_tx, _ = make_optimizer(backbone_cfg, steps_per_epoch, config.num_epochs)
        backbone_tx = transfer.after_steps(backbone_tx, int(t.head_first_epochs * steps_per_epoch))
        tx = transfer.transfer_optimizer(lambda p: transfer.param_labels(p, frozen), tx, backbone_tx)
    image_shape = ds.train_images.shape[1:]
    if spec.resize_to:
        image_shape = (spec.resize_to, spec.resize_to, image_shape[2])
    try:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
    except ValueError as err:
        raise ValueError(f"model {config.model.name!r} cannot take {ds.name} images of shape {image_shape}: "
                         f"{err}") from None
    state = create_train_state(model, tx, image_shape, jax.random.PRNGKey(config.seed))
    if config.get("whiten_init_images", 0):
        from cnnjax.train import airbench

        state = state.replace(params=airbench.init_whitening(
            state.params, ds.train_images[: int(config.whiten_init_images)], spec.mean, spec.std))
    if transfer_on and t.init_from:
        source, _ = checkpoint.restore_variables(t.init_from, "best")
        target = model_variables(state.params, state.batch_stats)
        merged = transfer.transplant(source, target)
        state = state.replace(params=merged["params"], batch_stats=merged.get("batch_stats", {}))
    if spec.lookahead is not None:
        state = init_lookahead(state)
    return model, spec, state, schedule


def _fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(models.create(name))}


def check_config(config: ml_collections.ConfigDict) -> None:
    if config.model.name not in models.available():
        raise ValueError(f"unknown model {config.model.name!r}; set --config.model.name to one of: "
                         f"{', '.join(models.available())}")
    if config.parallelism not in ("jit", "pmap", "sharded"):
        raise ValueError(f"--config.parallelism must be jit, pmap or sharded, got {config.parallelism!r}")
    if config.batch_size < 1 or config.num_epochs < 1:
        raise ValueError("--config.batch_size and --config.num_epochs must be >= 1")
    if config.get("tta", 0) not in TTA_LEVELS:
        raise ValueError(f"--config.tta must be 0 (off), 1 (mirror) or 2 (mirror + translate), got {config.tta!r}")
    if config.data.get("flip_mode", "random") not in FLIP_MODES:
        raise ValueError(f"--config.data.flip_mode must be random or alternate, got {config.data.flip_mode!r}")
    if config.data.get("pad_mode", "constant") not in PAD_MODES:
        raise ValueError(f"--config.data.pad_mode must be constant or reflect, got {config.data.pad_mode!r}")
    if config.get("lookahead_every", 0) < 0:
        raise ValueError("--config.lookahead_every must be >= 0 (0: off)")


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next chunk boundary and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread
                pass
        return self

    def _set(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _read_history(workdir: str, upto_epoch: int) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_history(workdir: str, history: list[dict]) -> None:
    _write_text_atomic(os.path.join(workdir, "metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in history))


def fit(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        stop_after_steps: int | None = None) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint); return the last metrics row.

    ``stop_after_steps`` simulates an interruption (as SIGTERM would) after that many steps of
    this call: the state is checkpointed and ``{'interrupted': True}`` is returned.
    """
    check_config(config)
    ds = load_data(config)
    train_images = prepare_images(ds.train_images, config.data.pad_to)
    test_images = prepare_images(ds.test_images, config.data.pad_to)
    ds = Dataset(ds.name, train_images, ds.train_labels, test_images, ds.test_labels, ds.class_names)
    if config.num_classes != ds.num_classes:
        raise ValueError(f"--config.num_classes={config.num_classes} but {ds.name} has {ds.num_classes} classes")
    steps_per_epoch = ds.train_images.shape[0] // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {ds.train_images.shape[0]} training images; "
                         "lower --config.batch_size")
    prepare_workdir(config, workdir)
    model, spec, state, _ = build(config, ds, steps_per_epoch)

    start_epoch, start_step_in_epoch, partial = 1, 0, None
    try:
        restored = checkpoint.restore_state(workdir, state)
    except ValueError as err:
        raise TrainingError(f"cannot resume from {workdir}: its checkpoint does not fit this config's optimizer or "
                            f"model ({str(err).splitlines()[0][:160]}); keep --config.optimizer as it was or use a "
                            "new --workdir") from None
    if restored is not None:
        state, meta = restored
        start_epoch, start_step_in_epoch, partial = meta["epoch"], meta["step_in_epoch"], meta.get("partial")
        if start_step_in_epoch >= steps_per_epoch:
            start_epoch, start_step_in_epoch, partial = start_epoch + 1, 0, None
    history = _read_history(workdir, start_epoch - 1)
    best = max((r["test_accuracy"] for r in history), default=-1.0)

    devices = None
    if config.get("num_devices"):
        if config.num_devices > jax.local_device_count():
            raise ValueError(f"--config.num_devices={config.num_devices} but only {jax.local_device_count()} local "
                             "devices (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        devices = jax.local_devices()[: config.num_devices]
    runner = Runner(spec, model.apply, config.parallelism, devices)
    print(f"{config.model.name} on {ds.name}: {ds.train_images.shape[0]} train / {ds.test_images.shape[0]} test "
          f"images, {config.parallelism} on {runner.n} {jax.default_backend()} device(s), "
          f"batch {config.batch_size}, {steps_per_epoch} steps/epoch", flush=True)
    images_d, labels_d = runner.put_data(ds.train_images, ds.train_labels)
    state = runner.put_state(state)
    data_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    chunk = max(1, int(config.log_every))
    steps_done_this_call = 0
    last = history[-1] if history else {}
    last_eval = None

    with _StopFlag() as stop:
        for epoch in range(start_epoch, config.num_epochs + 1):
            # The permutation is drawn and kept on the device; chunks are sliced there too.
            idx = epoch_batches(jax.random.fold_in(data_key, epoch), ds.train_images.shape[0], config.batch_size)
            first = start_step_in_epoch if epoch == start_epoch else 0
            acc = {k: float(v) for k, v in (partial or {}).items()} if epoch == start_epoch else {}
            t0, seen = time.perf_counter(), 0
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch}/{config.num_epochs}",
                       disable=not progress, leave=False, dynamic_ncols=True)
            pos = first
            while pos < steps_per_epoch:
                n = min(chunk, steps_per_epoch - pos)
                if stop_after_steps is not None:
                    n = min(n, max(1, stop_after_steps - steps_done_this_call))
                state, m = runner.train(state, images_d, labels_d, idx[pos:pos + n])
                m = jax.device_get(m)  # one host sync per log interval
                for k, v in m.items():
                    acc[k] = acc.get(k, 0.0) + float(v)
                pos += n
                steps_done_this_call += n
                seen += n * config.batch_size
                loss = acc["loss_sum"] / acc["count"]
                if not math.isfinite(loss):
                    bar.close()
                    raise TrainingError(f"loss became {loss} at epoch {epoch}, step {pos}; stopped and kept the "
                                        "last good checkpoint — lower --config.learning_rate or add "
                                        "--config.grad_clip_norm")
                bar.update(n)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc['correct'] / acc['count']:.4f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
                interrupted = stop.signal is not None or (stop_after_steps is not None
                                                          and steps_done_this_call >= stop_after_steps)
                if interrupted and pos < steps_per_epoch:
                    bar.close()
                    host_state = runner.get_state(state)
                    checkpoint.save(workdir, "latest", int(host_state.step), host_state,
                                    {"epoch": epoch, "step_in_epoch": pos, "partial": acc})
                    why = f"signal {stop.signal}" if stop.signal is not None else "stop_after_steps"
                    print(f"interrupted ({why}) at epoch {epoch}, step {pos}: checkpoint saved in {workdir}; "
                          "run the same command again to resume", flush=True)
                    return {"interrupted": True, "epoch": epoch, "step_in_epoch": pos}
            bar.close()
            epoch_time = time.perf_counter() - t0
            if epoch % max(1, config.get("eval_every", 1)) and epoch != config.num_epochs and stop.signal is None:
                print(f"epoch {epoch:3d}/{config.num_epochs}  train_loss {acc['loss_sum'] / acc['count']:.4f}  "
                      f"train_acc {acc['correct'] / acc['count']:.4f}  {epoch_time:.1f}s", flush=True)
                continue
            host_state = runner.get_state(state)
            ev = last_eval = runner.evaluate(state, ds.test_images, ds.test_labels, config.eval_batch_size)
            row = {
                "epoch": epoch,
                "step": int(host_state.step),
                "train_loss": acc["loss_sum"] / acc["count"],
                "train_accuracy": acc["correct"] / acc["count"],
                "test_loss": ev["loss"],
                "test_accuracy": ev["accuracy"],
                "epoch_time_s": epoch_time,
                "images_per_s": seen / epoch_time,
                "per_class_accuracy": [float(a) for a in ev["per_class_accuracy"]],
            }
            if not math.isfinite(ev["loss"]):
                raise TrainingError(f"test loss is {ev['loss']} after epoch {epoch}; stopped and kept the last good "
                                    "checkpoint — lower --config.learning_rate")
            history.append(row)
            _write_history(workdir, history)
            meta = {"epoch": epoch, "step_in_epoch": steps_per_epoch, "test_accuracy": ev["accuracy"],
                    "test_loss": ev["loss"]}
            checkpoint.save(workdir, "latest", row["step"], host_state, meta)
            if ev["accuracy"] > best:
                best = ev["accuracy"]
                checkpoint.save(workdir, "best", row["step"], host_state, meta)
            print(f"epoch {epoch:3d}/{config.num_epochs}  train_loss {row['train_loss']:.4f}  "
                  f"train_acc {row['train_accuracy']:.4f}  test_loss {row['test_loss']:.4f}  "
                  f"test_acc {row['test_accuracy']:.4f}  {epoch_time:.1f}s  {row['images_per_s']:.0f} img/s",
                  flush=True)
            last = row
            if stop.signal is not None:
                print(f"interrupted by signal {stop.signal} after epoch {epoch}: checkpoint saved; run again to "
                      "resume", flush=True)
                return {"interrupted": True, "epoch": epoch, "step_in_epoch": steps_per_epoch}

    if config.plots and history:
        if last_eval is None:  # nothing trained in this call (the run was already complete)
            last_eval = runner.evaluate(state, ds.test_images, ds.test_labels, config.eval_batch_size)
        write_plots(workdir, model, runner.get_state(state), ds, history, spec, last_eval)
    return last


def write_plots(workdir: str, model, state: TrainState, ds: Dataset, history: list[dict], spec: StepSpec,
                ev: dict) -> None:
    """Loss / accuracy curves, per-class accuracy and confusion matrix (from the final evaluation
    ``ev``), first-layer filters, feature maps of the first test image."""
    from cnnjax import viz

    variables = model_variables(state.params, state.batch_stats)
    viz.plot_curves(history, os.path.join(workdir, "curves.png"))
    viz.plot_per_class_accuracy(ev["per_class_accuracy"], ds.class_names, os.path.join(workdir, "per_class.png"))
    viz.plot_confusion_matrix(ev["confusion"], ds.class_names, os.path.join(workdir, "confusion.png"))
    x = prepare_batch(ds.test_images[:1], spec)  # as the model sees it (normalised, resized)
    convs = conv_outputs(model, variables, x)
    if convs:
        first_kernel = functools.reduce(lambda tree, key: tree[key], convs[0][0].split("/"), state.params)["kernel"]
        viz.plot_filters(np.asarray(first_kernel), os.path.join(workdir, "filters.png"))
        maps = [(path, np.asarray(out)[0]) for path, out in convs[:4]]
        viz.plot_feature_maps(ds.test_images[0], maps, os.path.join(workdir, "feature_maps.png"))


def conv_outputs(model, variables: dict, x: jax.Array) -> list[tuple[str, jax.Array]]:
    """``(module path, output [N, H', W', C])`` of every :class:`cnnjax.layers.Conv` in the order the
    forward pass calls them (eval mode). Parameter trees come back from ``jit`` with sorted keys,
    so call order is the only reliable 'first layer' (fast_cnn's ``whiten`` sorts after ``block1``)."""
    import flax.linen as nn

    from cnnjax.layers import Conv

    calls = []

    def record(call, args, kwargs, context):
        out = call(*args, **kwargs)
        if isinstance(context.module, Conv) and context.method_name == "__call__":
            calls.append(("/".join(context.module.path), out))
        return out

    with nn.intercept_methods(record):
        model.apply(variables, x, train=False)
    return calls
