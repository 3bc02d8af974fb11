"""``python -m cnnjax.cpu``: build the oneDNN library now and check one conv, two grouped ones (depthwise with two
outputs per channel, groups 2) and one max-pool against plain XLA."""

from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    from cnnjax import conv, layers
    from cnnjax.cpu import onednn, pool
    from cnnjax.cpu.conv import onednn_conv
    from cnnjax.errors import UsageError

    try:
        path = onednn.build(quiet=False)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not onednn.load().available:
        print(f"error: {onednn.load().what}", file=sys.stderr)
        return 2
    import jax

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
    pads = ((1, 1), (1, 1))
    conv_diff = float(np.max(np.abs(onednn_conv(x, kernel, (1, 1), pads) - conv.xla_conv(x, kernel, (1, 1), pads))))
    grouped_diff = 0.0
    for shape, groups, strides in (((3, 3, 1, 6), 3, (2, 2)), ((3, 3, 2, 4), 2, (1, 1))):  # depthwise x2, groups 2
        x_g = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 9, groups * shape[2]))
        w = jax.random.normal(jax.random.PRNGKey(3), shape)
        want = conv.xla_conv(x_g, w, strides, pads, groups=groups)
        grouped_diff = max(grouped_diff, float(np.max(np.abs(onednn_conv(x_g, w, strides, pads) - want))))
    pooled = pool.onednn_max_pool(x, (3, 3), (2, 2), (1, 1))
    pool_diff = float(np.max(np.abs(pooled - layers.reduce_window_max_pool(x, (3, 3), (2, 2), (1, 1)))))
    print(f"oneDNN kernels: {path} (max |diff| to plain XLA: conv {conv_diff:.1e}, max-pool {pool_diff:.1e})")
    print(f"grouped convs (depthwise with two outputs per channel, groups 2): max |diff| to plain XLA "
          f"{grouped_diff:.1e}")
    return 0 if conv_diff < 1e-4 and grouped_diff < 1e-4 and pool_diff == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
