"""``fashion_mnist_30min`` with airbench96's groups and training rules, at airbench94's widths.

Each group gets a third conv and a residual over its last two (``model.kwargs.residual``, about 1.4x the
step on 28x28 inputs), and the rules airbench96 settled on for about 30 epochs: warm-up over 10% of the steps,
then linear decay all the way to zero (not to 7% from 23%), weight decay 0.012 per 1024 examples (not 0.0153)
and torch's default BatchNorm momentum (0.1, Flax 0.9, not 0.4 / 0.6). lr stays airbench94's 11.5 (airbench96
lowers it to 9.0 for twice the widths).
"""

from experiments.configs import fashion_mnist_30min


def get_config():
    c = fashion_mnist_30min.get_config()
    c.model.kwargs.residual = True
    c.model.kwargs.bn_momentum = 0.9
    c.pct_start = 0.1
    c.lr_end_factor = 0.0
    c.weight_decay = 0.012
    return c
