"""Seed 004 ImprovedCNN on CIFAR-10 with crop + flip augmentation."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "improved_cnn"
    c.data.name = "cifar10"
    c.data.crop_padding = 4
    c.data.flip = True
    c.batch_size = 128
    c.num_epochs = 30
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.weight_decay = 5e-4
    c.schedule = "onecycle"
    return c
