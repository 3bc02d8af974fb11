"""The fast recipe (``cifar10_fast``, airbench94-style ``fast_cnn``) on Fashion-MNIST, in a 30-minute budget.

Unpadded 28x28 greyscale images; a 59,400 / 600 train / validation split (``data.val_fraction = 0.01``: the final
weights are kept, so the 600 images only report, with a standard error of about 0.75 points); batch 512 (lr and
wd are per 1024 examples); one evaluation after the last epoch (nothing is selected on test); bfloat16 compute
(``mixed_precision``), which fits more epochs in the budget where oneDNN has bfloat16 kernels (AVX-512).

``time_budget_s = 1620``: the run times its step first and trains as many epochs (at most 40) as fit in 27
minutes from the start of training, with the learning-rate schedule built for that many
(:mod:`cnnjax.train.budget`), and re-plans after any epoch whose pace would miss the deadline, compressing the
schedule into fewer epochs; the 3 minutes left cover the imports before, the plots after and the estimate's error.
How many epochs fit depends on the machine.

``--config.time_budget_s=0 --config.num_epochs=N --config.eval_every=N`` trains a fixed N.
``--config.data.dir=/usr/share/datasets/fashion-mnist`` reads Debian's IDX files instead of TFDS.
"""

from experiments.configs import cifar10_fast


def get_config():
    c = cifar10_fast.get_config()
    c.data.name = "fashion_mnist"
    c.num_epochs = 40
    c.eval_every = c.num_epochs
    c.data.val_fraction = 0.01  # more to train on; validation only reports (final weights)
    c.time_budget_s = 1620.0
    c.batch_size = 512  # twice the steps of cifar10_fast's 1024
    c.mixed_precision = True  # bfloat16 convolutions (oneDNN's, on CPUs with AVX-512 bfloat16 kernels)
    return c
