"""LeNet-5 on Fashion-MNIST (28x28 via padding 2 on the first conv)."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "lenet5"
    c.model.kwargs.conv1_padding = 2
    c.data.name = "fashion_mnist"
    c.batch_size = 128
    c.num_epochs = 10
    c.optimizer = "sgd"
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.schedule = "cosine"
    return c
