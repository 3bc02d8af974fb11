"""Pure shape / parameter / receptive-field analysis of CNNs, and model summaries.

* :func:`conv_output_size` and :func:`conv_params` are the seed formulas.
* :func:`receptive_field` is the recurrence ``R_l = R_{l-1} + (K_l - 1) d_l J_{l-1}`` with
  ``J_l = J_{l-1} S_l`` (``J_0 = 1``, ``R_0 = 1``); :func:`measured_receptive_field` measures the
  same thing on the real module (input-gradient support of one output unit).
* :func:`summary` traces a model abstractly (``jax.eval_shape``: nothing is allocated) and lists
  every leaf layer with its output shape, parameter count and receptive field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import layers
from cnnjax.errors import UsageError

Array = jax.Array


def conv_output_size(size: int, kernel: int, padding: int, stride: int, dilation: int = 1) -> int:
    """Output length of a conv / pool along one axis: ``floor((W + 2P - d(K-1) - 1) / S) + 1``."""
    if stride < 1 or kernel < 1 or dilation < 1 or padding < 0:
        raise UsageError(f"need stride, kernel, dilation >= 1 and padding >= 0; got S={stride}, "
                         f"K={kernel}, d={dilation}, P={padding}")
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise UsageError(f"input of size {size} is too small for kernel {kernel} (dilation {dilation}) "
                         f"with padding {padding}: output size would be {out}")
    return out


def conv_params(kh: int, kw: int, c_in: int, c_out: int, bias: bool = True, groups: int = 1) -> int:
    """Trainable parameters of a conv layer: ``Kh * Kw * (C_in / groups) * C_out (+ C_out)``."""
    if c_in % groups or c_out % groups:
        raise UsageError(f"groups={groups} must divide C_in={c_in} and C_out={c_out}")
    return kh * kw * (c_in // groups) * c_out + (c_out if bias else 0)


@dataclasses.dataclass(frozen=True)
class SpatialOp:
    """One spatial layer on a chain: square-or-not kernel, stride and dilation per axis."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)


def _as_op(op: Any) -> SpatialOp:
    if isinstance(op, SpatialOp):
        return op
    k, s, *rest = op
    d = rest[0] if rest else 1
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return SpatialOp(pair(k), pair(s), pair(d))


def receptive_field(ops: Iterable[Any]) -> tuple[int, int]:
    """Receptive field ``(R_h, R_w)`` of a chain of ops ``(kernel, stride[, dilation])`` or :class:`SpatialOp`.

    >>> receptive_field([(3, 1)] * 3)
    (7, 7)
    """
    r, j = np.array([1, 1]), np.array([1, 1])
    for op in map(_as_op, ops):
        r = r + (np.array(op.kernel) - 1) * np.array(op.dilation) * j
        j = j * np.array(op.stride)
    return int(r[0]), int(r[1])


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One leaf layer of a model as traced by :func:`summary`."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    receptive_field: tuple[int, int] | None  # None: not spatial, or on a shortcut branch
    op: SpatialOp | None


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-layer table and totals of a model at one input shape."""

    model: str
    input_shape: tuple[int, ...]
    rows: tuple[LayerRow, ...]
    total_params: int
    output_shape: tuple[int, ...]

    def receptive_field(self) -> tuple[int, int]:
        """Receptive field of the last spatial layer on the main path."""
        fields = [r.receptive_field for r in self.rows if r.receptive_field is not None]
        return fields[-1] if fields else (1, 1)

    def __str__(self) -> str:
        header = ("layer", "type", "output shape", "params", "RF")
        body = [
            (
                r.name,
                r.kind,
                str(r.output_shape),
                f"{r.params:,}",
                "-" if r.receptive_field is None else f"{r.receptive_field[0]}x{r.receptive_field[1]}",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        rule = "-" * len(fmt(header))
        lines = [f"{self.model}  input {self.input_shape} -> output {self.output_shape}", rule, fmt(header), rule]
        lines += [fmt(row) for row in body]
        lines += [rule, f"Total params: {self.total_params:,}"]
        return "\n".join(lines)


_SPATIAL_KINDS = (layers.Conv, layers.MaxPool, layers.AvgPool)
_LEAF_KINDS = _SPATIAL_KINDS + (layers.Dense, layers.BatchNorm, layers.Dropout)
SHORTCUT_MARKER = "downsample"  # modules on a parallel projection branch, skipped by the chain


def _spatial_op(module: nn.Module) -> SpatialOp:
    pair = layers.core.int_pair
    if isinstance(module, layers.Conv):
        return SpatialOp(pair(module.kernel_size, "k"), pair(module.stride, "s"), pair(module.dilation, "d"))
    stride = module.stride if module.stride is not None else module.window
    return SpatialOp(pair(module.window, "k"), pair(stride, "s"))


def _count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def summary(model: nn.Module, input_shape: Sequence[int], name: str | None = None) -> Summary:
    """Trace ``model`` on a ``[1, *input_shape]`` input and tabulate its leaf layers.

    ``input_shape`` is ``(H, W, C)`` (batch 1 is added). The receptive field column follows the
    main path in call order; projection shortcuts (``downsample_*``) run parallel to a block whose
    stride they repeat, so they show ``-`` and do not advance the recurrence.
    """
    calls: list[tuple[tuple[str, ...], nn.Module, tuple[int, ...]]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, _LEAF_KINDS):
            calls.append((tuple(context.module.path), context.module, tuple(out.shape)))
        return out

    def init(x):
        with nn.intercept_methods(record):
            rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}
            return model.init_with_output(rngs, x, train=False)

    # Shapes only: nothing is allocated, so any input size can be summarised.
    out, variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    params = variables.get("params", {})

    rows = []
    r, j = np.array([1, 1]), np.array([1, 1])
    for path, module, shape in calls:
        sub = params
        for key in path:
            sub = sub.get(key, {}) if isinstance(sub, dict) else {}
        on_shortcut = any(SHORTCUT_MARKER in p for p in path)
        op = _spatial_op(module) if isinstance(module, _SPATIAL_KINDS) else None
        if op is not None and not on_shortcut:
            r = r + (np.array(op.kernel) - 1) * np.array(op.dilation) * j
            j = j * np.array(op.stride)
        spatial = len(shape) == 4 and not on_shortcut
        rows.append(LayerRow("/".join(path), type(module).__name__, shape, _count(sub),
                             (int(r[0]), int(r[1])) if spatial else None, op))
    return Summary(name or type(model).__name__, tuple(input_shape), tuple(rows), _count(params),
                   tuple(out.shape))


def measured_receptive_field(
    model: nn.Module,
    variables: Any,
    input_shape: Sequence[int],
    layer: str | None = None,
    key: Array | None = None,
    num_samples: int = 32,
) -> tuple[int, int]:
    """Receptive field of one unit measured on the real module, in eval mode.

    Takes the output of leaf layer ``layer`` (a ``/``-joined path as in :func:`summary`; default:
    the last spatial layer on the main path), the unit at its spatial centre (summed over
    channels), and returns the height and width of the bounding box of input pixels with a
    non-zero gradient, taken as the union over ``num_samples`` random ``N(0, 1)`` inputs (max
    pooling and ReLU route the gradient of one input to a subset of the field).
    """
    if layer is None:
        spatial = [r for r in summary(model, input_shape).rows if r.receptive_field is not None]
        layer = spatial[-1].name
    path = tuple(layer.split("/"))
    key = jax.random.PRNGKey(0) if key is None else key

    def unit(x: Array) -> Array:
        _, state = model.apply(variables, x, train=False, mutable=["intermediates"],
                               capture_intermediates=lambda m, method: tuple(m.path) == path)
        inter = state["intermediates"]
        for p in path:
            inter = inter[p]
        fmap = inter["__call__"][0]
        if fmap.ndim != 4:
            raise UsageError(f"layer {layer!r} has output shape {fmap.shape}; pick a spatial layer")
        return fmap[:, fmap.shape[1] // 2, fmap.shape[2] // 2, :].sum()

    x = jax.random.normal(key, (num_samples, *input_shape), jnp.float32)
    grad = np.asarray(jax.grad(unit)(x))
    support = np.abs(grad).sum(axis=(0, 3)) > 0
    rows, cols = np.nonzero(support.any(axis=1))[0], np.nonzero(support.any(axis=0))[0]
    if rows.size == 0:
        raise UsageError(f"no input pixel influences layer {layer!r}: the gradient is zero everywhere")
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
