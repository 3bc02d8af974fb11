"""torchvision-layout ResNet-18 on CIFAR-10 at 32x32 (stride-32 stem: a weak but standard baseline)."""

from experiments.configs.base import cifar10_config


def get_config():
    c = cifar10_config("resnet18")
    c.num_epochs = 30
    c.optimizer = "nesterov"
    c.learning_rate = 0.1
    c.weight_decay = 5e-4
    c.schedule = "cosine"
    c.warmup_epochs = 1
    return c
