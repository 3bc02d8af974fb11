"""Fashion-MNIST speed run on a 2-core CPU (draft)."""

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
    c.learning_rate = 5e-3
    c.schedule = "onecycle"
    c.label_smoothing = 0.1
    c.tta = 1
    c.plots = False
    c.log_every = 100
    return c
