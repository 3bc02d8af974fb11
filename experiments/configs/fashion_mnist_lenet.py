"""LeNet-5 on Fashion-MNIST (28x28 via padding 2 on the first conv)."""

from experiments.configs import mnist_lenet


def get_config():
    c = mnist_lenet.get_config()
    c.data.name = "fashion_mnist"
    c.schedule = "cosine"
    return c
