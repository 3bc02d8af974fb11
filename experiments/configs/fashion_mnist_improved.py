"""Seed 004 ImprovedCNN (BN + Dropout) on Fashion-MNIST padded to 32x32, 1 channel."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "improved_cnn"
    c.data.name = "fashion_mnist"
    c.data.pad_to = 32
    c.data.crop_padding = 2
    c.batch_size = 128
    c.num_epochs = 10
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.weight_decay = 5e-4
    c.schedule = "onecycle"
    c.pct_start = 0.2
    return c
