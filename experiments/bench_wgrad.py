"""oneDNN's kernel-gradient paths, timed side by side on the bench models' convolutions:
``python -m experiments.bench_wgrad [--models fast_cnn,resnet18 --batch 128 --rounds 5 --steps 3]``.

For every stride-1 undilated conv with a kernel larger than 1x1 of each model (read from the model,
:func:`experiments.benchlib.model_convs`), random float32 ``x`` ``[B, H, W, C]`` and ``g`` ``[B, H', W', O]``, and
the kernel gradient computed by each path of the oneDNN handler: its backward-weights primitive ('native'), one
forward convolution with the batch as the channels ('forward'), one matrix product of the input patches ('matmul').
``--rounds`` rounds each take the fastest of ``--steps`` calls of every path, the paths in a rotating order, so
this machine's slow spells hit them alike; the table gives each path's median over the rounds, the fastest path,
the one :func:`cnnjax.conv.onednn_wgrad_path` picks here, and per model the sum over a train step's convs (each
conv's time times its calls) with 'native' everywhere and with the picks. Needs cnnjax's oneDNN kernels.
"""

from __future__ import annotations

import statistics
import sys

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

PATHS = ("native", "forward", "matmul")


def stride1_convs(name: str) -> list[dict]:
    """``model_convs(name)`` reduced to the stride-1, undilated, groups-1 convs whose kernel gradients 'auto' gives
    to oneDNN (:func:`cnnjax.conv.choose_impl`: not 1x1 kernels or outputs of at most 2x2), each with ``"kernel"``
    (its HWIO shape) and ``"pads"`` added."""
    import jax

    from cnnjax.conv import choose_impl
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
        if impl not in ("onednn", "shifted"):  # the greyscale shifted sum takes oneDNN's gradients
            continue
        out.append({**entry, "kernel": tuple(kernel), "pads": pads})
    return out


def time_paths(conv_entry: dict, batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Median over ``rounds`` of the fastest-of-``steps`` milliseconds of each path's kernel gradient."""
    import jax
    import numpy as np

    from cnnjax import conv
    from cnnjax.native import onednn

    (h, w, _), kernel, pads = conv_entry["input"], conv_entry["kernel"], conv_entry["pads"]
    ho, wo = conv.output_size(h, kernel[0], 1, pads[0]), conv.output_size(w, kernel[1], 1, pads[1])
    r = np.random.RandomState(0)
    x = jax.numpy.asarray(r.randn(batch, h, w, kernel[2]).astype(np.float32))
    g = jax.numpy.asarray(r.randn(batch, ho, wo, kernel[3]).astype(np.float32))
    fns = {p: jax.jit(lambda x, g, p=p: conv._onednn(onednn.KERNEL_GRAD, x, g, kernel, (1, 1), pads, (1, 1), p))
           for p in PATHS}
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(rounds):
        for p in PATHS[i % 3:] + PATHS[:i % 3]:
            times[p].append(fastest_ms(fns[p], x, g, steps=steps))
    return {p: statistics.median(t) for p, t in times.items()}


def main(argv):
    del argv
    from cnnjax import conv
    from cnnjax.native import onednn

    unknown = [name for name in FLAGS.models if name not in SHAPES]
    if unknown:
        raise UsageError(f"unknown bench row(s) {unknown}; choose from {', '.join(SHAPES)}")
    if not onednn.available():
        raise UsageError(f"bench_wgrad times oneDNN's kernels, which do not run here: {onednn.describe()}")
    print(f"float32 kernel gradients, batch {FLAGS.batch}, ms (median of {FLAGS.rounds} rounds of the fastest of "
          f"{FLAGS.steps} calls); {onednn.describe()}")
    print("| model | input | kernel | calls | native | forward | matmul | fastest | picked | picked / native |")
    print("|---|---|---|---:|---:|---:|---:|---|---|---:|")
    for name in FLAGS.models:
        native_sum = picked_sum = 0.0
        for entry in stride1_convs(name):
            ms = time_paths(entry, FLAGS.batch, FLAGS.rounds, FLAGS.steps)
            (h, w, _), kernel = entry["input"], entry["kernel"]
            out_hw = (conv.output_size(h, kernel[0], 1, entry["pads"][0]),
                      conv.output_size(w, kernel[1], 1, entry["pads"][1]))
            picked = conv.onednn_wgrad_path("float32", (FLAGS.batch, *entry["input"]), kernel, out_hw)
            native_sum += entry["count"] * ms["native"]
            picked_sum += entry["count"] * ms[picked]
            print(f"| {name} | {'x'.join(map(str, entry['input']))} | {'x'.join(map(str, kernel))} | "
                  f"{entry['count']} | {ms['native']:.1f} | {ms['forward']:.1f} | {ms['matmul']:.1f} | "
                  f"{min(ms, key=ms.get)} | {picked} | {ms[picked] / ms['native']:.2f} |", flush=True)
        print(f"| {name} | per step | | | {native_sum:.1f} | | | | {picked_sum:.1f} | "
              f"{picked_sum / max(native_sum, 1e-9):.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(cli.run(main))
