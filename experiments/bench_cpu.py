"""What each CPU speed-up buys, side by side in one run: ``python -m experiments.bench_cpu``.

Every variant runs in its own process (XLA flags are read once, at import) and adds one change to
the previous one:

1. ``baseline``: default XLA flags, XLA's convolution everywhere, max-pool by ``reduce_window``
   (select-and-scatter gradient) — cnnjax before the CPU work;
2. ``+ynn flag``: ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``;
3. ``+im2col``: :func:`cnnjax.conv.choose_impl`'s patches-times-matrix path for the shapes
   XLA:CPU handles badly (tiny outputs, strided and 1x1 convs);
4. ``+tiled max-pool``: non-overlapping max-pool by reshape with a first-maximum gradient;
5. ``+greyscale im2col``: patches @ kernel for 3x3 (or smaller) convs of a one-channel input (the
   first conv of SimpleCNN on Fashion-MNIST / MNIST);
6. ``+strided-view max-pool``: the tiled max-pool as an elementwise max of the windows' strided
   views, keeping the first maximum's position (int8) for the backward instead of the input;
7. ``+closed-form BatchNorm backward``: training BatchNorm as one custom VJP, its backward two channel
   sums and one elementwise pass instead of autodiff through the mean and variance;
8. ``+shifted-sum greyscale conv``: a one-channel conv with a multiple of 8 output channels as a sum
   of shifted views times kernel rows, with XLA's convolution gradients;
9. ``+8-channel LeNet``: LeNet-5 carries its 6-channel maps as 8 channels (2 exactly zero), so its
   first conv takes the shifted sum and XLA:CPU vectorises the tanh and pool after it;
10. ``+overlapping strided-view max-pool``: overlapping max-pools (ResNet's stem) as strided views too,
    their gradient added per stride phase instead of XLA's select-and-scatter;
11. ``+huge pages``: the process runs with glibc's ``glibc.malloc.hugetlb=1`` tunable, as the entry points
    do (``experiments.cli``); every earlier variant runs with ``glibc.malloc.hugetlb=0``;
12. ``+kept conv input``: XLA's convs keep their input for the weight gradient in a buffer XLA cannot fuse
    into (``cnnjax.conv.kept_input_conv``), instead of recomputing it inside the transposes;
13. ``+split strided conv``: strided convs of inputs up to 16 channels (cifar_resnet20's first downsampling
    conv, ResNet-18's 7x7 / 2 stem at 32x32) run XLA's forward and weight gradient with the patches path's
    input gradient (``cnnjax.conv.split_conv``), instead of building their narrow patches;
14. ``+broadcast tiled max-pool backward``: non-overlapping max-pools' backward as one select of the
    gradient broadcast over each tile, instead of stacking stride phases (concatenations on XLA:CPU);
15. ``+oneDNN convolutions``: oneDNN's convolutions through cnnjax's XLA FFI handler
    (``cnnjax.conv.onednn_conv``), where ``cnnjax.conv.choose_impl`` allows;
16. ``+oneDNN max-pool``: every max-pool through oneDNN's pooling kernels (``cnnjax.layers.onednn_max_pool``);
17. ``+tcmalloc``: the process runs with tcmalloc preloaded (Debian's libtcmalloc-minimal4), as the entry points
    do (``experiments.cli``), so XLA's per-step buffers are reused instead of mapped and faulted in afresh by
    glibc; every earlier variant runs on glibc's malloc;
18. ``+oneDNN greyscale gradients``: the gradients of the shifted-sum (greyscale) first convs by oneDNN
    (``cnnjax.conv.shifted_sum_onednn_conv``) instead of XLA's convolutions.

Rows are training throughput (images/s, batch 128, random uint8 data, SGD momentum 0.9) through
the real ``Runner``, next to PyTorch eager on the same network (timed in this process, which runs with
the entry points' settings, huge pages and tcmalloc included). Earlier variants are recreated by swapping the library
function back inside that variant's process.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.benchlib import CPU_VARIANTS as VARIANTS
from experiments.benchlib import (
    SHAPES,
    WARMUP_STEPS,
    bench_torch,
    in_fresh_process,
    run_cpu_variant,
    summarise,
    variant_env,
    variants_markdown,
)

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["lenet5", "improved_cnn", "cifar_resnet20", "resnet18", "fast_cnn"], "rows")
flags.DEFINE_integer("batch", 128, "batch size")
flags.DEFINE_integer("steps", 5, "timed steps per row (after compile and --warmup untimed steps)")
flags.DEFINE_integer("warmup", WARMUP_STEPS, "untimed steps per row before the timed ones, on both sides")
flags.DEFINE_bool("torch", True, "also time PyTorch eager")
flags.DEFINE_list("variants", list(VARIANTS), "variants to run (each in its own process)")
flags.DEFINE_integer("repeats", 1, "rounds over the variants, interleaved; each cell is the median")
flags.DEFINE_string("out", "", "write the results as JSON here")


def _spawn(variant: str, env: dict) -> dict:
    # In a process of its own, with the variant's environment (not through experiments.cli: importing it would
    # add the flag to the baseline too).
    try:
        return in_fresh_process(run_cpu_variant, variant, list(FLAGS.models), FLAGS.batch, FLAGS.steps,
                                FLAGS.warmup, env=env)
    except RuntimeError as e:
        raise RuntimeError(f"variant {variant!r}: {e}") from None


def main(argv):
    del argv
    unknown = [name for name in FLAGS.models if name not in SHAPES]
    if unknown:
        raise UsageError(f"unknown bench row(s) {unknown}; choose from {', '.join(SHAPES)}")
    bad = [v for v in FLAGS.variants if v not in VARIANTS]
    if bad or FLAGS.repeats < 1:
        raise UsageError(f"--variants must name some of {VARIANTS} and --repeats be >= 1; got {bad or FLAGS.repeats}")
    tcmalloc = cli.find_tcmalloc()
    # each variant's process environment, once: a variant this machine cannot run stops here, in one line
    envs = {variant: variant_env(variant, os.environ, tcmalloc) for variant in FLAGS.variants}
    runs: dict[str, list[dict]] = {}
    for _ in range(FLAGS.repeats):  # interleaved, so a slow spell of the machine hits every variant
        for variant in FLAGS.variants:
            runs.setdefault(variant, []).append(_spawn(variant, envs[variant]))
            print(f"# {variant}: " + ", ".join(f"{k} {v:.0f}" for k, v in runs[variant][-1].items()), flush=True)
        if FLAGS.torch:
            runs.setdefault("torch eager", []).append(
                {name: bench_torch(name, SHAPES[name], FLAGS.batch, FLAGS.steps, compiled=False,
                                   warmup=FLAGS.warmup)["train_img_s"]
                 for name in FLAGS.models})
    results = summarise(runs, FLAGS.models, statistics.median)
    print(variants_markdown(results, FLAGS.models, FLAGS.batch, FLAGS.repeats))
    fastest = summarise(runs, FLAGS.models, max)
    if FLAGS.repeats > 1:  # slow spells only ever slow a round down: each side's fastest round is its best estimate
        print("\n" + variants_markdown(fastest, FLAGS.models, FLAGS.batch, FLAGS.repeats, "fastest"))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"median": results, "fastest": fastest, "rounds": runs}, f, indent=2)


if __name__ == "__main__":
    sys.exit(cli.run(main))
