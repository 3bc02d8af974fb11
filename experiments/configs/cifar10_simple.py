"""Seed 004 SimpleCNN on CIFAR-10."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "simple_cnn"
    c.data.name = "cifar10"
    c.data.crop_padding = 4
    c.data.flip = True
    c.batch_size = 128
    c.num_epochs = 20
    c.optimizer = "sgd"
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.schedule = "cosine"
    return c
