"""Seed 004 ImprovedCNN on CIFAR-10 with crop + flip augmentation."""

from experiments.configs.base import cifar10_config


def get_config():
    c = cifar10_config("improved_cnn")
    c.num_epochs = 30
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.weight_decay = 5e-4
    c.schedule = "onecycle"
    return c
