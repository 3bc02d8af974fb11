"""The fast recipe (``cifar10_fast``, airbench94-style ``fast_cnn``) on Fashion-MNIST, sized for 30 minutes.

Unpadded 28x28 greyscale images, the 54,000 / 6,000 train / validation split, 18 epochs at batch 1024,
one evaluation after the last epoch, final weights (nothing is selected on test). On the project's 2-core
AMD EPYC (Zen 5) CPU of 2026-12-01: 95.10% test (95.40% validation) in 25 min 8 s wall from process start
(README, "Fast CIFAR-10 recipe"); 95.5% is not reached. On the 2-core Xeon before it, 10 epochs took
29 min 7 s (94.80%): pass ``--config.num_epochs=10 --config.eval_every=10`` there. On the slower 2-core
AMD EPYC Zen 4 of 2026-12-02, 8 epochs fit (``--config.num_epochs=8 --config.eval_every=8``: 94.61% test in
25 min 36 s). How many epochs fit depends on the machine: the log prints each epoch's seconds.
``--config.data.dir=/usr/share/datasets/fashion-mnist`` reads Debian's IDX files instead of TFDS.
"""

from experiments.configs import cifar10_fast


def get_config():
    c = cifar10_fast.get_config()
    c.data.name = "fashion_mnist"
    c.num_epochs = 18
    c.eval_every = c.num_epochs
    return c
