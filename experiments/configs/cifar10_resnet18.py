"""torchvision-layout ResNet-18 on CIFAR-10 at 32x32 (stride-32 stem: a weak but standard baseline)."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "resnet18"
    c.data.name = "cifar10"
    c.data.crop_padding = 4
    c.data.flip = True
    c.batch_size = 128
    c.num_epochs = 30
    c.optimizer = "nesterov"
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.schedule = "cosine"
    c.warmup_epochs = 1
    return c
