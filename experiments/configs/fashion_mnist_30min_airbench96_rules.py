"""``fashion_mnist_30min`` (airbench94's two-conv groups) with the training rules of airbench96.

The rules of ``fashion_mnist_30min_residual`` without its residual groups: warm-up over 10% of the steps, linear
decay to zero, weight decay 0.012 per 1024 examples, torch's default BatchNorm momentum (Flax 0.9). Run beside
the residual config on the same machine, it tells the groups' share of a difference from the rules'.
"""

from experiments.configs import fashion_mnist_30min_residual


def get_config():
    c = fashion_mnist_30min_residual.get_config()
    c.model.kwargs.residual = False
    return c
