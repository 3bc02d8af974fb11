"""LeNet-5 on MNIST (28x28 via padding 2 on the first conv)."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()  # SGD momentum 0.9, lr 0.05, batch 128, 10 epochs
    c.model.name = "lenet5"
    c.model.kwargs.conv1_padding = 2
    c.data.name = "mnist"
    return c
