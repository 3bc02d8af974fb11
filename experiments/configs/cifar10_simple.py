"""Seed 004 SimpleCNN on CIFAR-10."""

from experiments.configs.base import cifar10_config


def get_config():
    c = cifar10_config("simple_cnn")
    c.num_epochs = 20
    c.weight_decay = 5e-4
    c.schedule = "cosine"
    return c
