"""Per-op CPU timings behind ``cnnjax.conv.choose_impl`` and the tiled max-pool:
``python -m experiments.bench_conv [--steps N]``.

For each conv shape: forward, forward+tanh and forward+backward milliseconds through XLA's
convolution, the patches @ kernel path and (for few input channels) the shifted-sum path, and which
one ``choose_impl`` picks on this backend. (The forward+tanh column shows whether XLA:CPU still
vectorises the conv once the next activation is fused into it.) For 2x2
max-pool after ReLU (ties): forward+backward of ``reduce_window`` (XLA's select-and-scatter), the
earlier reshape-based tiled pool, and cnnjax's strided-view pool with its earlier (stacked stride phases)
and current (broadcast) backward, and oneDNN's pool (``layers.onednn_max_pool``, what cnnjax runs on the CPU
when its oneDNN kernels are built); for ResNet's overlapping 3x3 / stride 2 / padding 1 stem pool:
``reduce_window`` against the strided views and oneDNN's. Random fp32 data; each number is
the fastest of ``--steps`` calls after a compile call (the mean of them before 2026-12-01).
``--only conv|pool`` runs one part. A second conv table times strided convs forward+backward as
patches, as XLA's conv with its input kept, and as 'split' (:func:`cnnjax.conv.split_conv`).

``--only torch [--models cifar_resnet20,fast_cnn]`` times every conv of those bench models (read from the
model itself, :func:`experiments.benchlib.model_convs`) as their train step runs it, forward and
forward+backward (no input gradient for the first conv), in cnnjax (``impl='auto'``) and in PyTorch eager
(NCHW, as ``experiments.bench`` runs the twin), and sums them per step: how much of a model's gap to
PyTorch is its convolutions.
"""

from __future__ import annotations

import contextlib
import functools
import sys

from absl import flags

from experiments import cli
from experiments.benchlib import conv_vs_torch_rows, fastest_ms

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 10, "timed calls per number")
flags.DEFINE_enum("only", "all", ["all", "conv", "pool", "torch"],
                  "which tables to time (torch: only the bench models' convs against PyTorch)")
flags.DEFINE_list("models", ["cifar_resnet20", "fast_cnn"], "--only torch: bench rows whose convs to time")
flags.DEFINE_integer("batch", 128, "--only torch: batch size")

# (batch, H=W, C_in, C_out, kernel, stride, padding, first layer: no input gradient)
CONV_CASES = [
    (128, 2, 256, 256, 3, 1, 1, False),   # ResNet-18 layer3 at 32x32 input: output 2x2
    (128, 1, 512, 512, 3, 1, 1, False),   # ResNet-18 layer4 at 32x32 input: output 1x1
    (128, 2, 512, 512, 3, 1, 1, False),
    (128, 3, 256, 256, 3, 1, 1, False),   # fast_cnn block3: output 3x3 (XLA kept)
    (128, 4, 256, 512, 3, 2, 1, False),   # strided, output 2x2
    (128, 32, 16, 32, 3, 2, 1, False),    # strided, output 16x16
    (16, 28, 128, 256, 3, 2, 1, False),   # strided, output 14x14
    (16, 56, 64, 128, 3, 2, 1, False),    # strided, output 28x28 (XLA kept)
    (128, 32, 64, 64, 1, 1, 0, False),    # 1x1
    (16, 56, 64, 256, 1, 1, 0, False),
    (128, 32, 32, 32, 3, 1, 1, False),    # ImprovedCNN conv2 (XLA kept)
    (16, 224, 3, 64, 7, 2, 3, True),      # ResNet stem at 224 (XLA kept)
    (128, 32, 3, 16, 3, 1, 1, True),      # CIFAR ResNet stem (XLA kept: RGB stems are mixed)
    (128, 32, 3, 64, 3, 1, 1, True),
    (128, 32, 1, 6, 5, 1, 0, True),       # LeNet conv1 on 32x32 greyscale (XLA kept: 6 channels do not vectorise)
    (128, 32, 1, 8, 5, 1, 0, True),
    (128, 28, 1, 6, 5, 1, 2, True),       # LeNet conv1 on 28x28 greyscale
    (128, 28, 1, 16, 3, 1, 1, True),      # SimpleCNN conv1 on 28x28 greyscale
    (128, 32, 1, 64, 3, 1, 1, True),
]
# Strided convs for the 'split' table: (batch, H=W, C_in, C_out, kernel, stride, padding, first layer).
STRIDED_CASES = [
    (128, 32, 16, 32, 3, 2, 1, False),    # cifar_resnet20's first downsampling conv (split)
    (128, 32, 3, 64, 7, 2, 3, True),      # ResNet-18's stem at 32x32 (split)
    (128, 16, 32, 64, 3, 2, 1, False),    # cifar_resnet20's second downsampling conv (patches)
    (128, 8, 128, 256, 3, 2, 1, False),   # ResNet-18 layer3 at 32x32 (patches)
    (16, 28, 128, 256, 3, 2, 1, False),   # ResNet-18 layer3 at 224 / 4 (patches)
]
POOL_SHAPES = [(128, 32, 32, 32), (128, 16, 16, 64), (128, 30, 30, 64), (128, 28, 28, 16), (128, 14, 14, 32),
               (128, 15, 15, 256)]
# ResNet's stem max-pool input: ResNet-18 at 32x32 (batch 128) and at 224x224 (batch 16).
STEM_POOL_SHAPES = [(128, 16, 16, 64), (16, 112, 112, 64)]


def conv_rows(steps: int) -> list[str]:
    import jax
    import numpy as np

    from cnnjax import conv

    rng = np.random.RandomState(0)
    rows = []
    for case in CONV_CASES:
        (_, _, c_in, _, k, _, _, _), (x, w) = case, _case_data(rng, case)
        cells = []
        for impl in ("xla", "im2col", "shifted"):
            if impl == "shifted" and k * k * c_in > conv.SHIFTED_MAX_TERMS:
                cells += [None] * 3
                continue
            f, grad = _conv_and_grad(case, impl)
            tanh = jax.jit(lambda x, w, f=f: jax.numpy.tanh(f(x, w)))
            cells += [fastest_ms(jax.jit(f), x, w, steps=steps), fastest_ms(tanh, x, w, steps=steps),
                      fastest_ms(jax.jit(grad), x, w, steps=steps)]
        rows.append(_case_row(case, ["-" if c is None else f"{c:.2f}" for c in cells]))
    return rows


def _case_data(rng, case: tuple) -> tuple:
    """``(x [N, H, W, C_in], kernel [k, k, C_in, C_out])`` of a conv case, random."""
    import jax
    import numpy as np

    n, hw, c_in, c_out, k, _, _, _ = case
    x = jax.numpy.asarray(rng.randn(n, hw, hw, c_in).astype(np.float32))
    w = jax.numpy.asarray(rng.randn(k, k, c_in, c_out).astype(np.float32) * 0.05)
    return x, w


def _conv_and_grad(case: tuple, impl: str, after=lambda y: y) -> tuple:
    """``(conv(x, w), grad of sum(after(conv(x, w)) ** 2))`` of a conv case under ``impl``; the gradient is
    the kernel's only for a first layer (no input gradient), else the input's and the kernel's."""
    import jax

    from cnnjax import conv

    _, _, _, _, _, s, p, first = case
    f = functools.partial(conv.conv2d, strides=(s, s), padding=((p, p), (p, p)), impl=impl)
    return f, jax.grad(lambda x, w: (after(f(x, w)) ** 2).sum(), argnums=(1,) if first else (0, 1))


def _case_row(case: tuple, cells: list[str]) -> str:
    """A markdown row: the conv case, its cells and the path ``choose_impl`` picks for it here."""
    from cnnjax import conv

    n, hw, c_in, c_out, k, s, p, first = case
    pick = conv.choose_impl((hw, hw), (k, k), (s, s), ((p, p), (p, p)), in_channels=c_in, out_channels=c_out)
    return (f"| [{n},{hw},{hw},{c_in}] -> {c_out}, {k}x{k} s{s} p{p}{' (no input grad)' if first else ''} | "
            + " | ".join(cells) + f" | {pick} |")


def strided_rows(steps: int) -> list[str]:
    """Forward+backward ms of strided convs as patches, as XLA's conv with its input kept, and split
    (XLA's forward and weight gradient, the patches path's input gradient)."""
    import jax
    import numpy as np

    rng = np.random.RandomState(0)
    rows = []
    for case in STRIDED_CASES:
        x, w = _case_data(rng, case)
        cells = []
        for impl in ("im2col", "kept", "split"):
            _, grad = _conv_and_grad(case, impl, after=jax.numpy.tanh)
            cells.append(fastest_ms(jax.jit(grad), x, w, steps=steps))
        rows.append(_case_row(case, [f"{c:.2f}" for c in cells]))
    return rows


@contextlib.contextmanager
def _pool_flags(broadcast: bool, onednn: bool):
    """Within the block, ``layers.max_pool`` takes the broadcast tiled backward or not, and oneDNN's pool or not
    (both flags are read when a function is traced, so the caches are cleared on the way in and out)."""
    import jax

    from cnnjax import layers

    saved = layers.TILED_POOL_BROADCAST_BACKWARD, layers.USE_ONEDNN_POOL_ON_CPU
    layers.TILED_POOL_BROADCAST_BACKWARD, layers.USE_ONEDNN_POOL_ON_CPU = broadcast, onednn
    jax.clear_caches()
    try:
        yield
    finally:
        layers.TILED_POOL_BROADCAST_BACKWARD, layers.USE_ONEDNN_POOL_ON_CPU = saved
        jax.clear_caches()


def _onednn_pool_ms(loss, *args, steps: int) -> float:
    """Fastest forward+backward ms of ``loss`` with oneDNN's max-pool, or NaN where it cannot run here."""
    import jax

    from cnnjax import layers

    with _pool_flags(broadcast=True, onednn=True):
        if not layers.onednn_pool_usable(args[0]):
            return float("nan")
        return fastest_ms(jax.jit(jax.grad(loss)), *args, steps=steps)


def pool_rows(steps: int) -> list[str]:
    import jax
    import numpy as np
    from jax import lax

    from cnnjax import layers
    from experiments.benchlib import _reshape_max_pool

    rng = np.random.RandomState(0)
    rows = []
    for shape in POOL_SHAPES:
        x = jax.nn.relu(jax.numpy.asarray(rng.randn(*shape).astype(np.float32)))  # after ReLU: ties at 0
        window = lambda v: lax.reduce_window(v, -jax.numpy.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # noqa: E731
        h2, w2 = shape[1] // 2 * 2, shape[2] // 2 * 2  # floor mode
        # The output gradient is an input of its own, as in a train step (where other fusions make it).
        weight = jax.numpy.asarray(rng.randn(shape[0], h2 // 2, w2 // 2, shape[3]).astype(np.float32))
        cells = [fastest_ms(jax.jit(jax.grad(lambda v, w, f=f: (f(v) * w).sum())), x, weight, steps=steps)
                 for f in (window, lambda v, h2=h2, w2=w2: _reshape_max_pool(v[:, :h2, :w2], 2, 2))]
        for broadcast in (False, True):  # the strided views' backward: stacked stride phases, or broadcast
            with _pool_flags(broadcast=broadcast, onednn=False):
                grad = jax.jit(jax.grad(lambda v, w: (layers.max_pool(v, 2) * w).sum()))
                cells.append(fastest_ms(grad, x, weight, steps=steps))
        cells.append(_onednn_pool_ms(lambda v, w: (layers.max_pool(v, 2) * w).sum(), x, weight, steps=steps))
        rows.append(f"| {list(shape)} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return rows


def overlapping_pool_rows(steps: int) -> list[str]:
    """ResNet's stem max-pool (3x3, stride 2, padding 1) after ReLU, forward+backward ms: ``reduce_window``
    and its autodiff against ``layers.max_pool``'s strided views."""
    import jax
    import numpy as np
    from jax import lax

    from cnnjax import layers

    rng = np.random.RandomState(0)
    rows = []
    for shape in STEM_POOL_SHAPES:
        x = jax.nn.relu(jax.numpy.asarray(rng.randn(*shape).astype(np.float32)))
        window = lambda v: lax.reduce_window(v, -jax.numpy.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),  # noqa: E731
                                             ((0, 0), (1, 1), (1, 1), (0, 0)))
        def pooled_loss(v):
            return (layers.max_pool(v, 3, 2, 1) ** 2).sum()

        cells = [fastest_ms(jax.jit(jax.grad(lambda v, f=window: (f(v) ** 2).sum())), x, steps=steps)]
        with _pool_flags(broadcast=True, onednn=False):
            cells.append(fastest_ms(jax.jit(jax.grad(pooled_loss)), x, steps=steps))
        cells.append(_onednn_pool_ms(pooled_loss, x, steps=steps))
        rows.append(f"| {list(shape)} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return rows


def main(argv):
    del argv
    import jax

    print(f"backend {jax.default_backend()}, {FLAGS.steps} calls per number, milliseconds per call\n")
    if FLAGS.only == "torch":
        for name in FLAGS.models:
            print(f"**{name}**, batch {FLAGS.batch}: each conv as the train step runs it\n")
            print("| conv | calls per step | cnnjax fwd | cnnjax fwd+bwd | PyTorch fwd | PyTorch fwd+bwd "
                  "| cnnjax speed / PyTorch's, fwd+bwd |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for row in conv_vs_torch_rows(name, FLAGS.batch, FLAGS.steps):
                print(row, flush=True)
            print()
    if FLAGS.only in ("all", "conv"):
        print("| conv | " + " | ".join(f"{impl} {what}" for impl in ("xla", "im2col", "shifted")
                                       for what in ("fwd", "fwd+tanh", "fwd+bwd")) + " | choose_impl |")
        print("|---|" + "---|" * 10)
        for row in conv_rows(FLAGS.steps):
            print(row, flush=True)
        print("\n| strided conv, forward+backward after tanh | patches (im2col) | XLA, input kept (kept) | split "
              "| choose_impl |")
        print("|---|---|---|---|---|")
        for row in strided_rows(FLAGS.steps):
            print(row, flush=True)
    if FLAGS.only in ("all", "pool"):
        print("\n| 2x2 max-pool after ReLU, forward+backward of sum(pool * weight) | reduce_window | reshape (before) "
              "| strided views, stacked phases (before) | strided views, broadcast backward (before) "
              "| oneDNN (cnnjax) |")
        print("|---|---|---|---|---|---|")
        for row in pool_rows(FLAGS.steps):
            print(row, flush=True)
        print("\n| 3x3 / 2 / 1 max-pool after ReLU, forward+backward | reduce_window | strided views (before) "
              "| oneDNN (cnnjax) |")
        print("|---|---|---|---|")
        for row in overlapping_pool_rows(FLAGS.steps):
            print(row, flush=True)


if __name__ == "__main__":
    sys.exit(cli.run(main))
