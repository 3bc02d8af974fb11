"""The plots of a finished run: curves, per-class accuracy, confusion, first-layer filters, feature maps."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from cnnjax.train.state import TrainState, model_variables
from cnnjax.train.steps import StepSpec, prepare_batch


def write_plots(workdir: str, model, state: TrainState, class_names: tuple[str, ...], image: np.ndarray,
                history: list[dict], spec: StepSpec, ev: dict) -> None:
    """Loss / accuracy curves (train vs val), per-class accuracy and confusion matrix (from the final
    evaluation ``ev``), first-layer filters, feature maps of ``image`` (uint8 ``[H, W, C]``)."""
    from cnnjax import viz

    variables = model_variables(state.params, state.batch_stats)
    viz.plot_curves(history, os.path.join(workdir, "curves.png"), split="val")
    viz.plot_per_class_accuracy(ev["per_class_accuracy"], class_names, os.path.join(workdir, "per_class.png"))
    viz.plot_confusion_matrix(ev["confusion"], class_names, os.path.join(workdir, "confusion.png"))
    x = prepare_batch(image[None], spec)  # as the model sees it (normalised, resized)
    convs = conv_outputs(model, variables, x)
    if convs:
        first_kernel = functools.reduce(lambda tree, key: tree[key], convs[0][0].split("/"), state.params)["kernel"]
        viz.plot_filters(np.asarray(first_kernel), os.path.join(workdir, "filters.png"))
        maps = [(path, np.asarray(out)[0]) for path, out in convs[:4]]
        viz.plot_feature_maps(image, maps, os.path.join(workdir, "feature_maps.png"))


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
