"""Seed 004: TinyCNN on the synthetic 8x8 stripes (vertical vs horizontal)."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "tiny_cnn"
    c.num_classes = 2
    c.data.name = "stripes"
    c.data.cache_dir = ""
    c.batch_size = 32
    c.eval_batch_size = 80
    c.num_epochs = 10
    c.optimizer = "adam"
    c.learning_rate = 0.01
    c.log_every = 10
    return c
