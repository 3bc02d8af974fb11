"""Fashion-MNIST speed run on a 2-core CPU: >= 91% test accuracy in about 30 s from process start.

``simple_cnn`` on unpadded 28x28 images (conv 16 -> pool -> conv 32 -> pool -> FC 1568 -> 128 -> 10),
random horizontal flips, Adam with optax's one-cycle schedule (peak 1.2e-2), label smoothing 0.1,
batch 128, 3 epochs, mirror test-time augmentation, final weights (evaluated on validation and test
once, after the last epoch). The peak learning rate was picked on validation accuracy only.
``python -m experiments.bench.speedrun --config THIS --data_dir DIR`` times it against its PyTorch twin
(experiments/bench/RESULTS.md).
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "simple_cnn"
    c.model.kwargs.image_size = 28
    c.data.name = "fashion_mnist"
    c.data.flip = True
    c.batch_size = 128
    c.num_epochs = 3
    c.eval_every = 3
    c.optimizer = "adam"
    c.learning_rate = 1.2e-2
    c.schedule = "onecycle"
    c.label_smoothing = 0.1
    c.tta = 1
    c.plots = False
    c.log_every = 100
    return c
