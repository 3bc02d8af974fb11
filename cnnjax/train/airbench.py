"""airbench94's training rules for :class:`cnnjax.models.fast.FastNet`, in optax / pure functions.

Parameter groups (names as FastNet's): the whitening kernel is frozen (set from data by
:func:`init_whitening`), the whitening bias trains only for the first ``whiten_bias_steps``,
BatchNorm biases take ``bias_lr_scale`` times the learning rate, everything else the base rate.

The public recipe states its hyper-parameters for a loss *summed* over a batch of 1024 and torch's
coupled weight decay: ``lr_t = lr / (1024 (1 + 1 / (1 - momentum)))`` and ``wd_t = wd B / (1024 (1 +
1 / (1 - momentum))) / lr_t``. cnnjax averages the loss, so the same updates come from
``lr_mean = lr_t B`` and an L2 term ``lambda = wd_t / B`` per group (its ``lr * lambda`` product, the
per-step shrink, is the same in every group); both follow the schedule, as torch's do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax.data.pipeline import normalize
from cnnjax.errors import UsageError
from cnnjax.models.fast import whitening_kernel


def param_labels(params: Any) -> Any:
    """Tree of group names, one per leaf of FastNet-style ``params``."""

    def label(path, _):
        keys = [getattr(p, "key", "") for p in path]
        if keys[0] == "whiten":
            return "frozen" if keys[-1] == "kernel" else "whiten_bias"
        if keys[-1] == "bias" and len(keys) > 1 and keys[-2].startswith("norm"):
            return "norm_bias"
        return "other"

    return jax.tree_util.tree_map_with_path(label, params)


def optimizer(lr: float, weight_decay: float, momentum: float, batch_size: int, schedule: optax.Schedule,
              bias_lr_scale: float = 64.0, whiten_bias_steps: int = 0) -> optax.GradientTransformation:
    """Nesterov SGD with airbench's groups; ``lr`` / ``weight_decay`` in the recipe's units (see module
    doc), ``schedule`` a multiplier of the learning rate (1.0 at the peak)."""
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr_mean = lr * batch_size / kilostep
    shrink = weight_decay * batch_size / kilostep  # lr * lambda: the per-step decay of every group

    def group(scale: float, steps: int | None = None) -> optax.GradientTransformation:
        rate = lr_mean * scale
        parts = [optax.add_decayed_weights(shrink / rate),
                 optax.sgd(lambda s: rate * schedule(s), momentum=momentum, nesterov=True)]
        if steps is not None:
            parts.append(optax.scale_by_schedule(lambda s: (s < steps).astype(jnp.float32)))
        return optax.chain(*parts)

    return optax.multi_transform({"frozen": optax.set_to_zero(), "whiten_bias": group(1.0, whiten_bias_steps),
                                  "norm_bias": group(bias_lr_scale), "other": group(1.0)}, param_labels)


def init_whitening(params: Any, images: np.ndarray, mean, std, eps: float = 5e-4) -> Any:
    """``params`` with ``whiten/kernel`` set from uint8 training images ``[N, H, W, C]`` (normalised
    first, as airbench uses the first 5000 training images without augmentation)."""
    if "whiten" not in params:
        raise UsageError("whitening init needs a model with a 'whiten' conv (fast_cnn); set "
                         "`whiten_init_images`=0 for other models")
    x = np.asarray(normalize(images, mean, std))
    kernel = jnp.asarray(whitening_kernel(x, eps))
    if kernel.shape != params["whiten"]["kernel"].shape:
        raise UsageError(f"whitening kernel {kernel.shape} does not fit the model's {params['whiten']['kernel'].shape}")
    return {**params, "whiten": {**params["whiten"], "kernel": kernel}}
