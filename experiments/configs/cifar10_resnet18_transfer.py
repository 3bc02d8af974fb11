"""ResNet-18 with ported ImageNet weights on CIFAR-10 (needs the data and the weight file).

First port the weights: ``python -m experiments.port --arch resnet18 --weights resnet18-f37072fd.pth
--out workdirs/resnet18_imagenet``. Then, e.g. fine-tuning from layer3 at 32x32:
``python -m experiments.train --config experiments/configs/cifar10_resnet18_transfer.py --workdir DIR``.
``--config.data.resize_to=224`` upsamples on the device to the backbone's native resolution
(about 49x the compute per image); ``--config.transfer.mode=feature_extraction`` trains the head only.
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "resnet18"
    c.data.name = "cifar10"
    c.data.crop_padding = 4
    c.data.flip = True
    c.data.resize_to = 0
    c.batch_size = 128
    c.num_epochs = 10
    c.optimizer = "sgd"
    c.learning_rate = 1e-2          # head
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.schedule = "cosine"
    c.transfer.init_from = "workdirs/resnet18_imagenet"
    c.transfer.mode = "finetune"
    c.transfer.unfreeze_from = "stem"
    c.transfer.backbone_lr = 1e-3   # 10x smaller than the head
    c.transfer.head_first_epochs = 1
    return c
