"""He et al. 2015 ResNet-20 on CIFAR-10: SGD 0.1, momentum 0.9, wd 1e-4, batch 128, crop + flip."""

from experiments.configs.base import cifar10_config


def get_config():
    c = cifar10_config("cifar_resnet20")
    c.num_epochs = 160
    c.learning_rate = 0.1
    c.weight_decay = 1e-4
    c.schedule = "piecewise"
    c.boundaries_epochs = (80, 120)
    c.decay_factor = 0.1
    return c
