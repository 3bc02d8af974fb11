"""oneDNN's alternative paths for one conv, timed side by side on the bench models' convolutions:
``python -m experiments.bench_onednn_paths [--models fast_cnn,resnet18 --batch 128 --rounds 5 --steps 3]``.

For every stride-1 undilated conv of each model that 'auto' gives oneDNN (read from the model,
:func:`experiments.benchlib.model_convs`), with random float32 operands, two tables:

- the kernel gradient by each path of the handler: its backward-weights primitive ('native'), one forward
  convolution with the batch as the channels ('forward'), one matrix product of the input patches ('matmul');
  and the one :func:`cnnjax.conv.onednn_wgrad_path` picks here;
- the forward by oneDNN's forward primitive and as the input gradient of the transposed conv, and which one
  :func:`cnnjax.conv.onednn_forward_as_input_gradient` picks here.

``--rounds`` rounds each take the fastest of ``--steps`` calls of every path, the paths in a rotating order, so this
machine's slow spells hit them alike; each table gives every path's median over the rounds, the fastest, the pick,
and per model the sum over a train step's convs (each conv's time times its calls) with oneDNN's own primitive
everywhere and with the picks. Needs cnnjax's oneDNN kernels.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.benchlib import SHAPES, fastest_ms, model_convs

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["improved_cnn", "cifar_resnet20", "resnet18", "fast_cnn", "fast_cnn@28"],
                  "bench rows whose convs to time")
flags.DEFINE_integer("batch", 128, "batch size")
flags.DEFINE_integer("rounds", 5, "rounds; each times every path")
flags.DEFINE_integer("steps", 3, "calls per path per round (the fastest counts)")

FORWARD_PATHS = ("primitive", "input gradient")


def stride1_convs(name: str) -> list[dict]:
    """``model_convs(name)`` reduced to the stride-1, undilated convs whose forward and kernel gradient 'auto' gives
    to oneDNN (:func:`cnnjax.conv.choose_impl`: not 1x1 kernels or outputs of at most 2x2; greyscale shifted sums
    for their gradients only), each with ``"kernel"`` (its HWIO shape), ``"pads"``, ``"out_hw"`` and ``"impl"``
    added."""
    import jax

    from cnnjax.conv import choose_impl, output_size
    from cnnjax.layers import canonical_padding

    out = []
    for entry in model_convs(name):
        m = entry["module"]
        kernel = jax.eval_shape(lambda x, m=m: m.init(jax.random.PRNGKey(0), x),
                                jax.ShapeDtypeStruct((1, *entry["input"]), jax.numpy.float32))["params"]["kernel"].shape
        pads = canonical_padding(m.padding)
        if m.stride not in (1, (1, 1)) or m.dilation not in (1, (1, 1)) or isinstance(pads, str):
            continue
        impl = choose_impl(entry["input"][:2], kernel[:2], (1, 1), pads, groups=m.groups, backend="cpu",
                           in_channels=kernel[2], out_channels=kernel[3], onednn=True)
        if impl not in ("onednn", "shifted"):
            continue
        out_hw = tuple(output_size(entry["input"][i], kernel[i], 1, pads[i]) for i in range(2))
        out.append({**entry, "kernel": tuple(kernel), "pads": pads, "out_hw": out_hw, "impl": impl})
    return out


def median_ms(fns: dict[str, Callable], args: tuple, rounds: int, steps: int) -> dict[str, float]:
    """Median over ``rounds`` of the fastest-of-``steps`` milliseconds of each of ``fns`` on ``args``, the order of
    the paths rotating from round to round."""
    names = list(fns)
    times: dict[str, list[float]] = {p: [] for p in names}
    for i in range(rounds):
        k = i % len(names)
        for p in names[k:] + names[:k]:
            times[p].append(fastest_ms(fns[p], *args, steps=steps))
    return {p: statistics.median(t) for p, t in times.items()}


def _operands(entry: dict, batch: int):
    import jax.numpy as jnp
    import numpy as np

    (h, w, _), kernel = entry["input"], entry["kernel"]
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(batch, h, w, kernel[2]).astype(np.float32))
    g = jnp.asarray(r.randn(batch, *entry["out_hw"], kernel[3]).astype(np.float32))
    k = jnp.asarray(r.randn(*kernel).astype(np.float32))
    return x, g, k


def wgrad_ms(entry: dict, batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Each kernel-gradient path's median milliseconds for ``entry``'s conv."""
    import jax

    from cnnjax import conv
    from cnnjax.native import onednn

    x, g, _ = _operands(entry, batch)
    kernel, pads = entry["kernel"], entry["pads"]
    fns = {p: jax.jit(lambda x, g, p=p: conv._onednn(onednn.KERNEL_GRAD, x, g, kernel, (1, 1), pads, (1, 1), p))
           for p in conv.WGRAD_PATHS}
    return median_ms(fns, (x, g), rounds, steps)


def forward_ms(entry: dict, batch: int, rounds: int, steps: int) -> dict[str, float]:
    """The forward primitive's and the transposed input gradient's median milliseconds for ``entry``'s conv."""
    import jax

    from cnnjax import conv

    x, _, k = _operands(entry, batch)
    pads = entry["pads"]
    fns = {p: jax.jit(lambda x, k, t=(p != FORWARD_PATHS[0]): conv._onednn_forward(x, k, (1, 1), pads, (1, 1), t))
           for p in FORWARD_PATHS}
    return median_ms(fns, (x, k), rounds, steps)


def _table(title: str, paths: tuple[str, ...], rows: list[tuple[str, dict, str, int]]) -> None:
    """Prints ``rows`` of ``(model, {path: ms}, picked path, calls per step)`` (per-model sums after each model's
    rows; the first path is oneDNN's own primitive)."""
    print(f"\n{title}\n")
    print(f"| model | input | kernel | calls | {' | '.join(paths)} | fastest | picked | picked / {paths[0]} |")
    print(f"|---|---|---|---:|{'---:|' * len(paths)}---|---|---:|")
    for i, (model, entry, ms, picked) in enumerate(rows):
        print(f"| {model} | {'x'.join(map(str, entry['input']))} | {'x'.join(map(str, entry['kernel']))} | "
              f"{entry['count']} | {' | '.join(f'{ms[p]:.1f}' for p in paths)} | {min(ms, key=ms.get)} | {picked} | "
              f"{ms[picked] / ms[paths[0]]:.2f} |")
        if i + 1 == len(rows) or rows[i + 1][0] != model:
            mine = [r for r in rows if r[0] == model]
            own = sum(e["count"] * m[paths[0]] for _, e, m, _ in mine)
            picks = sum(e["count"] * m[p] for _, e, m, p in mine)
            cells = [model, "per step", "", "", f"{own:.1f}", *[""] * (len(paths) - 1), "", f"{picks:.1f}",
                     f"{picks / max(own, 1e-9):.2f}"]
            print(f"| {' | '.join(cells)} |")


def main(argv):
    del argv
    from cnnjax import conv
    from cnnjax.native import onednn

    unknown = [name for name in FLAGS.models if name not in SHAPES]
    if unknown:
        raise UsageError(f"unknown bench row(s) {unknown}; choose from {', '.join(SHAPES)}")
    if not onednn.available():
        raise UsageError(f"bench_onednn_paths times oneDNN's kernels, which do not run here: {onednn.describe()}")
    print(f"float32, batch {FLAGS.batch}, ms (median of {FLAGS.rounds} rounds of the fastest of {FLAGS.steps} calls); "
          f"{onednn.describe()}")
    wgrads, forwards = [], []
    for name in FLAGS.models:
        for entry in stride1_convs(name):
            x_shape = (FLAGS.batch, *entry["input"])
            wgrads.append((name, entry, wgrad_ms(entry, FLAGS.batch, FLAGS.rounds, FLAGS.steps),
                           conv.onednn_wgrad_path("float32", x_shape, entry["kernel"], entry["out_hw"])))
            if entry["impl"] == "onednn":  # greyscale shifted sums keep their own forward
                as_grad = conv.onednn_forward_as_input_gradient("float32", entry["kernel"][:2], (1, 1), entry["pads"],
                                                                (1, 1))
                forwards.append((name, entry, forward_ms(entry, FLAGS.batch, FLAGS.rounds, FLAGS.steps),
                                 FORWARD_PATHS[int(as_grad)]))
    _table("Kernel gradients", tuple(conv.WGRAD_PATHS), wgrads)
    _table("Forwards", FORWARD_PATHS, forwards)


if __name__ == "__main__":
    sys.exit(cli.run(main))
